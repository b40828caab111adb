"""`model.utterance_center` (model/targets.py, center_utterance_targets): the CLS targets centred per dimension
across the batch; "none" leaves them as they are."""

from __future__ import annotations

import pytest
import torch

from model.sslam import SSLAM
from model.targets import center_utterance_targets, utterance_target
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
    for center in ("none", "batch"):
        torch.manual_seed(0)
        model = SSLAM(tiny_config(stage=stage, padding="aware", utterance_norm="layer_norm", utterance_center=center))
        _, parts, _, _ = _run(model, _short_batch(model, 0.0))
        losses[center] = parts
    assert losses["batch"]["eat_patch"] == losses["none"]["eat_patch"]
    assert not torch.isclose(losses["batch"]["eat_cls"], losses["none"]["eat_cls"])
