"""`model.utterance_center` (model/targets.py, center_utterance_targets; model/utterance_centre.py): the CLS
targets centred per dimension across the batch ("batch") or by a running mean of batch means ("running");
"none" leaves them as they are."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from model.sslam import SSLAM
from jobs.pretrain import Pretrainer
from jobs.train.config import ConfigError, load_config
from model.targets import center_utterance_targets, utterance_target
from model.utterance_centre import UtteranceCentre
from tests.test_padding_aware import _run, _short_batch
from tests.test_sslam import tiny_config


def _hand_batch() -> tuple[list[torch.Tensor], torch.Tensor]:
    """Two layers of three clips of four tokens over D=3; clip 1 has two content tokens, clip 2 three."""
    generator = torch.Generator().manual_seed(5)
    ffn = [torch.randn(3, 4, 3, generator=generator) * 2 + torch.tensor([1.0, -2.0, 0.5]) for _ in range(2)]
    content = torch.tensor([[True] * 4, [True, True, False, False], [True, True, True, False]])
    return ffn, content


def test_batch_centred_target_is_the_layer_norm_target_minus_its_batch_mean_over_content_tokens():
    ffn, content = _hand_batch()
    plain = utterance_target(ffn, 2, content)
    centred = center_utterance_targets(plain, "batch")
    torch.testing.assert_close(centred.mean(dim=0), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(centred, plain - plain.mean(dim=0, keepdim=True))
    layer_normed = [torch.nn.functional.layer_norm(layer, (3,), eps=1e-5) for layer in ffn]
    by_hand = torch.stack([
        ((layer_normed[0][clip, :n] + layer_normed[1][clip, :n]) / 2).mean(dim=0) for clip, n in enumerate((4, 2, 3))
    ])
    torch.testing.assert_close(centred, by_hand - by_hand.mean(dim=0, keepdim=True))
    changed = [layer.clone() for layer in ffn]
    for layer in changed:
        layer[~content] = 1e3  # padding tokens change nothing
    torch.testing.assert_close(center_utterance_targets(utterance_target(changed, 2, content), "batch"), centred)


def test_none_leaves_the_targets_as_they_are():
    ffn, content = _hand_batch()
    plain = utterance_target(ffn, 2, content)
    assert center_utterance_targets(plain, "none") is plain


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="utterance_center"):
        center_utterance_targets(torch.zeros(2, 3), "dino")


@pytest.mark.parametrize("stage", [1, 2])
def test_the_model_trains_on_centred_cls_targets_in_both_stages(stage):
    """The patch loss is unchanged and only the CLS loss moves (both stages use _utterance_targets)."""
    losses = {}
    for center in ("none", "batch", "running"):
        torch.manual_seed(0)
        model = SSLAM(tiny_config(stage=stage, padding="aware", utterance_norm="layer_norm", utterance_center=center))
        _, parts, _, _ = _run(model, _short_batch(model, 0.0))
        losses[center] = parts
    assert losses["batch"]["eat_patch"] == losses["none"]["eat_patch"]
    assert not torch.isclose(losses["batch"]["eat_cls"], losses["none"]["eat_cls"])
    # A running centre starts as the first batch's mean, so its first step is the batch-centred one.
    assert losses["running"]["eat_cls"] == losses["batch"]["eat_cls"]
    assert losses["running"]["eat_patch"] == losses["none"]["eat_patch"]


def _batches(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(9)
    return [torch.randn(4, 3, generator=generator) + shift for shift in torch.arange(count).float()]


def test_running_centre_is_an_exponential_average_of_batch_means():
    first, second, third = _batches(3)
    centre = UtteranceCentre("running", momentum=0.75)
    torch.testing.assert_close(centre(first, update=True), first - first.mean(dim=0), rtol=0, atol=0)
    expected = 0.75 * first.mean(dim=0) + 0.25 * second.mean(dim=0)
    torch.testing.assert_close(centre(second, update=True), second - expected)
    torch.testing.assert_close(centre.value, expected)
    # Far from the batch mean: after two batches the centre still remembers the first (shift 0 vs 1).
    assert float((centre.value - second.mean(dim=0)).abs().max()) > 0.1
    # Not training: subtracted, not moved.
    torch.testing.assert_close(centre(third, update=False), third - expected)
    torch.testing.assert_close(centre.value, expected)


def test_without_a_centre_an_eval_forward_subtracts_the_batch_mean_and_keeps_nothing():
    (batch,) = _batches(1)
    centre = UtteranceCentre("running", momentum=0.9)
    torch.testing.assert_close(centre(batch, update=False), batch - batch.mean(dim=0))
    assert centre.value is None and centre.state() is None


def test_running_centre_state_round_trips_exactly_and_a_wrong_size_is_refused():
    centre = UtteranceCentre("running", momentum=0.9)
    for batch in _batches(3):
        centre(batch / 3.0, update=True)
    again = UtteranceCentre("running", momentum=0.9)
    again.load(json.loads(json.dumps(centre.state())), dim=3)  # as run_state.json holds it
    assert torch.equal(again.value, centre.value)
    (batch,) = _batches(1)
    assert torch.equal(again(batch, update=True), centre(batch, update=True))
    with pytest.raises(ValueError, match="3 values.*targets have 5"):
        again.load(centre.state(), dim=5)
    again.load(None, dim=3)
    assert again.value is None


def test_the_stateless_modes_keep_no_state():
    for mode in ("none", "batch"):
        centre = UtteranceCentre(mode, momentum=0.9)
        centre(_batches(1)[0], update=True)
        assert centre.state() is None


@pytest.mark.parametrize("momentum", [-0.1, 1.0])
def test_a_momentum_outside_0_1_is_refused_at_config_load(momentum):
    with pytest.raises(ConfigError, match="utterance_center_momentum"):
        load_config("tiny_stage1", [f"model.utterance_center_momentum={momentum}"])
    with pytest.raises(ValueError, match="utterance_center_momentum"):
        UtteranceCentre("running", momentum)


def test_the_model_moves_its_running_centre_in_training_mode_only():
    torch.manual_seed(0)
    model = SSLAM(tiny_config(stage=1, padding="aware", utterance_norm="layer_norm", utterance_center="running"))
    batch = _short_batch(model, 0.0)
    _run(model, batch)
    first = model.utterance_centre.value.clone()
    assert first.shape == (model.cfg.embed_dim,)
    model.eval()
    with torch.no_grad():
        model(batch, torch.Generator().manual_seed(7))
    assert torch.equal(model.utterance_centre.value, first)
    model.train()
    _run(model, batch)
    assert not torch.equal(model.utterance_centre.value, first)
    # Not part of the student's weights: DeepSpeed and the export see the encoder and decoder only.
    assert not any("centre" in name for name in model.state_dict())


def _restoring_rank(rank: int, world_size: int, mode: str = "running") -> SimpleNamespace:
    config = tiny_config(stage=1, utterance_center=mode)
    return SimpleNamespace(model=SimpleNamespace(utterance_centre=UtteranceCentre(mode, 0.9)), rank=rank,
                           world_size=world_size, config=SimpleNamespace(model=config))


def test_a_resume_restores_each_ranks_centre_or_their_mean_on_another_rank_count(tmp_path, caplog):
    dim = tiny_config(stage=1).embed_dim
    saved = [[float(rank)] * dim for rank in range(2)]
    same = _restoring_rank(1, 2)
    Pretrainer._restore_utterance_centre(same, saved, tmp_path)
    assert same.model.utterance_centre.state() == saved[1]
    other = _restoring_rank(0, 3)
    Pretrainer._restore_utterance_centre(other, saved, tmp_path)
    assert other.model.utterance_centre.state() == [0.5] * dim
    fresh = _restoring_rank(0, 2)
    with caplog.at_level("WARNING"):
        Pretrainer._restore_utterance_centre(fresh, [None, None], tmp_path)  # written by `none` or `batch`
    assert fresh.model.utterance_centre.state() is None and "no running utterance centre" in caplog.text
    stateless = _restoring_rank(0, 2, mode="batch")
    Pretrainer._restore_utterance_centre(stateless, saved, tmp_path)
    assert stateless.model.utterance_centre.state() is None
