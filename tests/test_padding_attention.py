"""`model.padding: aware` attends to content only and can take an utterance target that keeps what a clip is:
an aware encoder's features of a clip do not depend on how much padding follows it (training and extraction
alike), a reference encoder's do; `model.utterance_norm: layer_norm` targets differ between clips where the
instance-normed ones are nearly constant."""

from __future__ import annotations

import torch

from model.checkpoint import ImportedCheckpoint
from model.encoder import Encoder
from model.features import extract_features
from model.padding import content_tokens
from model.pretrained import FrontEnd, PretrainedEncoder, content_frames
from model.sslam import SSLAM
from model.targets import cls_target, make_targets, utterance_target
from tests.test_sslam import group_batch, raw_fbank, tiny_config


def _encoder(padding: str) -> Encoder:
    torch.manual_seed(0)
    return Encoder(tiny_config(padding=padding)).eval()


def test_aware_features_of_a_clip_do_not_depend_on_the_padding_after_it():
    aware, reference = _encoder("aware"), _encoder("reference")
    clip = raw_fbank(1, aware.cfg, seed=2)[:, :, :48]  # 3 of 8 time rows
    padded = torch.nn.functional.pad(clip, (0, 0, 0, 128 - 48))
    valid = torch.tensor([40])
    short = extract_features(aware, clip, pooling="content_mean", valid_frames=valid)
    long = extract_features(aware, padded, pooling="content_mean", valid_frames=valid)
    torch.testing.assert_close(long["utterance"], short["utterance"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(long["frames"][:, :6], short["frames"], rtol=1e-5, atol=1e-5)
    cls_short = extract_features(aware, clip, valid_frames=valid)["utterance"]
    torch.testing.assert_close(extract_features(aware, padded, valid_frames=valid)["utterance"], cls_short,
                               rtol=1e-5, atol=1e-5)
    # The control: a reference encoder's CLS reads the padding tokens.
    assert not torch.allclose(extract_features(reference, padded, valid_frames=valid)["utterance"],
                              extract_features(reference, clip, valid_frames=valid)["utterance"], atol=1e-3)


def test_aware_training_loss_does_not_depend_on_padding_tokens_being_attended():
    """Doubling a padded tail's token values through the positional table would move attention outputs; with the
    content mask the student's and teacher's content outputs only see content and the CLS."""
    torch.manual_seed(0)
    model = SSLAM(tiny_config(padding="aware"))
    tokens = model.encoder.embed(raw_fbank(2, model.cfg, seed=4))
    content = content_tokens(torch.tensor([40, 128]), 8, 2, 16)
    moved = tokens.clone()
    moved[~content] = 1e3
    first, _ = model.teacher.contextualize(tokens, content=content)
    second, _ = model.teacher.contextualize(moved, content=content)
    keep = torch.cat([torch.ones(2, 1, dtype=torch.bool), content], dim=1)
    torch.testing.assert_close(first[keep], second[keep])


def test_layer_norm_utterance_targets_vary_between_clips_where_instance_normed_ones_hardly_do():
    torch.manual_seed(0)
    model = SSLAM(tiny_config())
    batch = group_batch(model.cfg, 2, groups=4, seed=1)
    content = content_tokens(torch.tensor([30, 128, 60, 128, 100, 20, 128, 80]), 8, 2, 16)
    with torch.no_grad():
        _, ffn = model.teacher(batch["clean"], content=content)
    ffn = [f[:, 1:] for f in ffn]
    instance_normed = cls_target(make_targets(ffn, 2, content), content)
    layer_normed = utterance_target(ffn, 2, content)
    assert layer_normed.shape == instance_normed.shape == (8, 32)
    # Per channel, the token mean of an instance norm over the same tokens is 0: only the final LayerNorm's
    # per-token scaling leaves anything.
    assert float(layer_normed.var(dim=0).mean()) > 5 * float(instance_normed.var(dim=0).mean())
    # Without content it is the plain token mean of the per-token LayerNorms.
    plain = torch.stack([torch.nn.functional.layer_norm(f, (32,), eps=1e-5) for f in ffn]).mean(0).mean(1)
    torch.testing.assert_close(utterance_target(ffn, 2), plain)


def test_the_registered_model_of_an_aware_encoder_attends_to_each_rows_content(tmp_path):
    import json
    from types import SimpleNamespace

    import numpy as np
    import pandas as pd

    from jobs.mlops.pyfunc_model import SSLAMEncoderModel
    from jobs.mlops.pyfunc_package import audio_config_for, model_spec
    from jobs.train.checkpointing import sha256_file
    from model.checkpoint import ImportedCheckpoint, save_weights
    from pipeline.config import AudioConfig

    cfg = tiny_config(padding="aware")
    torch.manual_seed(0)
    weights = ImportedCheckpoint(config=cfg, kind="encoder", student_encoder=dict(Encoder(cfg).state_dict()))
    artifacts = {"weights": str(tmp_path / "encoder.safetensors"), "config": str(tmp_path / "model_config.json")}
    save_weights(weights, artifacts["weights"])
    audio = AudioConfig(target_length=cfg.target_length, mel_bins=cfg.mel_bins)
    (tmp_path / "model_config.json").write_text(json.dumps(model_spec(
        cfg, audio_config_for(cfg, audio), weights_sha256=sha256_file(artifacts["weights"]))))
    model = SSLAMEncoderModel()
    model.load_context(SimpleNamespace(artifacts=artifacts, model_config={"device": "cpu"}))
    short = raw_fbank(1, cfg, seed=5)[0, 0, :40].numpy()
    outputs = model.predict(None, pd.DataFrame({"fbank": [list(short)]}))
    # 40 frames padded to the 48 of three whole patches: the same CLS as the clip in a 128-frame input.
    alone = extract_features(model.encoder, torch.nn.functional.pad(torch.from_numpy(short), (0, 0, 0, 8))[None],
                             valid_frames=torch.tensor([40]))["utterance"]
    np.testing.assert_allclose(outputs["utterance"], alone.numpy(), rtol=1e-4, atol=1e-5)


def _pretrained(padding: str) -> PretrainedEncoder:
    encoder = _encoder(padding)
    weights = ImportedCheckpoint(encoder.cfg, "encoder", encoder.state_dict())
    return PretrainedEncoder(weights, FrontEnd(sample_rate=16000, mel_bins=encoder.cfg.mel_bins,
                                               target_length=encoder.cfg.target_length))


def test_one_waveform_is_embedded_from_its_content_alone_by_an_aware_encoder():
    wave = 0.3 * torch.sin(torch.arange(8000) * 0.07)  # 0.5 s: far shorter than the target length
    for padding in ("aware", "reference"):
        model = _pretrained(padding)
        fbank = model.front_end.fbank(wave, 16000)
        valid = content_frames(fbank)
        assert valid == 1 + (8000 - 400) // 160 and bool((fbank[valid:] == 0).all()) and bool((fbank[valid - 1] != 0).any())
        embedded = torch.from_numpy(model.embed(wave, 16000)["utterance"])
        attended = model.embed_fbank(fbank[None], valid_frames=torch.tensor([valid]))["utterance"][0]
        padded = model.embed_fbank(fbank[None])["utterance"][0]
        torch.testing.assert_close(embedded, attended)
        # Only the aware encoder leaves the padding out of attention; the reference one embeds as before.
        assert (not torch.allclose(embedded, padded, atol=1e-4)) if padding == "aware" else torch.equal(embedded, padded)
