"""Content-mean pooling (model.features, jobs.evaluate `eval.pooling: content_mean`), the probe's optional
ZCA whitening (`eval.whiten`), and the config rules of `model.padding`."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from jobs import evaluate as evaluate_job
from jobs.train.config import ConfigError, load_config
from model.encoder import Encoder
from model.features import content_mean_frames, extract_features, pool_tokens
from tests.test_padding_loader import F, PATCH, T, write_set
from tests.test_sslam import tiny_config


def test_content_mean_pools_content_tokens_only():
    hidden = torch.zeros(2, 1 + 4, 3)
    hidden[:, 1:3] = 1.0
    hidden[:, 3:] = 100.0
    content = torch.tensor([[True, True, False, False], [True, True, True, True]])
    pooled = pool_tokens(hidden, "content_mean", content)
    assert pooled[0].tolist() == [1.0] * 3 and pooled[1].tolist() == [50.5] * 3
    with pytest.raises(ValueError, match="valid frame count"):
        pool_tokens(hidden, "content_mean")


def test_extract_features_content_mean_ignores_padding_values():
    cfg = tiny_config()
    torch.manual_seed(0)
    encoder = Encoder(cfg)
    fbank = torch.randn(2, 1, cfg.target_length, cfg.mel_bins) - 6
    valid = torch.tensor([40, 128])
    loud = fbank.clone()
    loud[0, 0, 40:] = 1e4
    fbank[0, 0, 40:] = 0.0
    quiet = extract_features(encoder, fbank, pooling="content_mean", valid_frames=valid)
    poisoned = extract_features(encoder, loud, pooling="content_mean", valid_frames=valid)
    assert torch.equal(quiet["utterance"], poisoned["utterance"])
    # 40 frames of 16 -> 3 content time rows of 8, each of Fp = 2 tokens
    expected = quiet["frames"][0, : 3 * cfg.freq_patches].mean(0)
    torch.testing.assert_close(quiet["utterance"][0], expected)
    torch.testing.assert_close(quiet["utterance"][1], quiet["frames"][1].mean(0))
    mean = extract_features(encoder, fbank, pooling="mean")["utterance"]
    assert not torch.allclose(mean[0], quiet["utterance"][0])
    with pytest.raises(ValueError, match="valid_frames"):
        extract_features(encoder, fbank, pooling="content_mean")


class _PatchMeanModel:
    """A stand-in pyfunc: frame token (t, f) = the mean of its raw fbank patch; CLS = the mean of all."""

    model_cfg = SimpleNamespace(patch_size=PATCH, mel_bins=F)

    def embed(self, fbank: torch.Tensor, pooling: str | None = None) -> dict[str, torch.Tensor]:
        assert pooling in ("cls", "mean")
        batch = fbank.shape[0]
        patches = fbank.reshape(batch, T // PATCH, PATCH, F // PATCH, PATCH).mean(dim=(2, 4))
        frames = patches.reshape(batch, -1, 1)
        return {"utterance": frames.mean(1) if pooling == "mean" else fbank.mean(dim=(1, 2))[:, None],
                "frames": frames}


def test_evaluate_extracts_content_mean_features_from_valid_frames(tmp_path):
    write_set(tmp_path)
    config = load_config("tiny_stage1", ["eval.pooling=content_mean", "data.loader.num_workers=0"])
    features = evaluate_job.extract(_PatchMeanModel(), config, str(tmp_path), "eval").features
    means = evaluate_job.extract(
        _PatchMeanModel(), load_config("tiny_stage1", ["eval.pooling=mean", "data.loader.num_workers=0"]),
        str(tmp_path), "eval").features
    from pipeline.eval_loader import EvalLoader
    from pipeline.config import LoaderConfig

    batch = next(iter(EvalLoader(LoaderConfig(shards=str(tmp_path), num_workers=0), "eval", batch_size=8)))
    for row, valid in enumerate(batch["valid_frames"].tolist()):  # 17, 64, 40 frames: 3, 8, 5 rows of 8
        rows = -(-valid // PATCH)
        expected = batch["clean"][row, 0, : rows * PATCH].mean()
        torch.testing.assert_close(features[row, 0], expected)
    assert features[0, 0] < means[0, 0]  # the zero padding no longer pulls the quiet clip's mean up
    torch.testing.assert_close(features[1], means[1])
    direct = content_mean_frames(_PatchMeanModel().embed(batch["clean"][:, 0], "cls")["frames"],
                                 batch["valid_frames"], PATCH, F // PATCH)
    torch.testing.assert_close(features, direct)


def test_whitening_gives_the_train_features_identity_covariance():
    generator = torch.Generator().manual_seed(0)
    mixing_matrix = torch.randn(6, 6, generator=generator)
    features = torch.randn(4000, 6, generator=generator) @ mixing_matrix + 3
    labels = torch.nn.functional.one_hot(torch.randint(0, 3, (4000,), generator=generator), 3).float()
    cfg = load_config("tiny_stage1", ["eval.whiten=true", "eval.epochs=1"]).eval
    probe = evaluate_job.train_probe(features, labels, cfg, multi_label=False)
    assert len(probe) == 3
    with torch.no_grad():
        whitened = probe[1](probe[0](features))
    # In the eigenbasis of the standardised covariance, eigenvalue λ becomes λ / (λ + WHITEN_EPS): 1 unless tiny.
    standardised = probe[0](features).double()
    eigenvalues, vectors = torch.linalg.eigh(torch.cov(standardised.T))
    expected = eigenvalues / (eigenvalues + evaluate_job.WHITEN_EPS)
    torch.testing.assert_close(torch.cov(whitened.double().T), (vectors * expected) @ vectors.T, atol=1e-4, rtol=0)
    assert expected.min() < 0.9 < expected.max()  # both regimes occur in this draw
    plain = evaluate_job.train_probe(features, labels, load_config("tiny_stage1", ["eval.epochs=1"]).eval, False)
    assert len(plain) == 2


def test_padding_config_values_and_the_stage2_mixing_rule():
    assert load_config("tiny_stage1", ["model.padding=aware"]).model.padding == "aware"
    assert load_config("tiny_stage1").model.padding == "reference"
    with pytest.raises(ConfigError, match="'model.padding' must be one of 'reference', 'aware'"):
        load_config("tiny_stage1", ["model.padding=masked"])
    with pytest.raises(ConfigError, match="needs data.mixing.mix_padding=silence"):
        load_config("tiny_stage2", ["model.padding=aware", "data.mixing.mix_padding=zero"])
    config = load_config("tiny_stage2", ["model.padding=aware", "data.mixing.mix_padding=silence"])
    assert config.model.stage == 2
    with pytest.raises(ConfigError, match="'eval.pooling' must be one of 'cls', 'mean', 'content_mean'"):
        load_config("tiny_stage1", ["eval.pooling=content"])
