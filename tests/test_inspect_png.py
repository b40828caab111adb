"""`sslam inspect --png`: one colour scale, padding hatched, time in seconds, class names in titles, a colour bar.

One preprocessing run over a tiny folder source (tests/folder_set.py) whose written "Bird" clips (0.8 s) are
shorter than the 128 frames of the front-end, so their last frames are zero padding. The assertions are on the
figure object, not on pixels.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from folder_set import T, preprocess_folder_set
from matplotlib.image import AxesImage

from jobs.cli import main as sslam
from jobs.train.config import load_config
from pipeline import audio, shards, storage
from pipeline.inspect import PADDING_GID, WINDOW_GID, _valid_frames, preview_figure

BIRD_FRAMES = audio.frame_count(int(0.8 * 16000), load_config("tiny_stage1").data.audio)


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("png")
    preprocess_folder_set(root)
    return SimpleNamespace(output=root / "shards", info=json.loads((root / "shards" / "dataset.json").read_text()))


def _spectrogram_axes(figure) -> list:
    return [axis for axis in figure.axes if axis.get_visible() and any(isinstance(a, AxesImage) for a in axis.images)
            and axis.get_title()]


def test_one_scale_padding_hatched_seconds_and_class_names(folder_run):
    figure = preview_figure(str(folder_run.output), n_groups=4)
    axes = _spectrogram_axes(figure)
    assert len(axes) >= 6
    limits = {axis.images[0].get_clim() for axis in axes}
    assert len(limits) == 1, limits  # one colour scale for the figure
    low, high = limits.pop()
    assert low < high
    colour_bars = [axis for axis in figure.axes if axis.get_ylabel().startswith("raw log-mel")]
    assert len(colour_bars) == 1

    shift_s = folder_run.info["frame_shift_ms"] / 1000
    for axis in axes:
        assert axis.get_xlabel() == "time (s)"
        assert axis.get_xlim() == pytest.approx((0.0, T * shift_s))
    clip_axes = [axis for axis in axes if axis.get_title().startswith("c")]
    birds = [axis for axis in clip_axes if axis.get_title().endswith("\nBird")]
    cats = [axis for axis in clip_axes if axis.get_title().endswith("\nCat")]
    assert birds and cats and len(birds) + len(cats) == len(clip_axes)
    for axis in birds:
        padding = [patch for patch in axis.patches if patch.get_gid() == PADDING_GID]
        assert len(padding) == 1 and padding[0].get_hatch() == "//"
        assert padding[0].get_x() == pytest.approx(BIRD_FRAMES * shift_s)
        assert padding[0].get_width() == pytest.approx((T - BIRD_FRAMES) * shift_s)
        assert axis.images[0].get_array().mask[:, BIRD_FRAMES:].all()
        assert not axis.images[0].get_array().mask[:, :BIRD_FRAMES].any()
    for axis in cats:
        assert not [patch for patch in axis.patches if patch.get_gid() == PADDING_GID]
    mixture_axes = [axis for axis in axes if axis.get_title().startswith("m")]
    assert mixture_axes and all(
        len([patch for patch in axis.patches if patch.get_gid() == WINDOW_GID]) == 2 for axis in mixture_axes
    )


def test_the_scale_ignores_padding_zeros(folder_run):
    """Padding is exact zeros; a scale that took them in would reach 0 although no real frame does."""
    figure = preview_figure(str(folder_run.output), n_groups=4)
    low, high = _spectrogram_axes(figure)[0].images[0].get_clim()
    assert high < 0 or low > 0


def test_the_sample_json_length_wins_and_the_zero_rule_is_the_fallback():
    clip = np.full((10, 4), -3.0, dtype=np.float32)
    clip[7:] = 0.0
    assert _valid_frames(clip, None) == 7
    assert _valid_frames(clip, 5) == 5  # the json's count (e.g. `valid_frames`) is trusted when valid
    assert _valid_frames(clip, 0) == 7 and _valid_frames(clip, 11) == 7 and _valid_frames(clip, True) == 7
    assert _valid_frames(np.zeros((4, 2)), None) == 0


def test_valid_frames_in_the_sample_json_are_used(folder_run, tmp_path):
    """A set whose sample json says `valid_frames` (and no `frames`): the padding patch starts there."""
    copy = tmp_path / "set"
    shutil.copytree(folder_run.output, copy)
    for path in sorted(copy.glob("train-*.tar")):
        rewritten = []
        for key, members in shards.read_shard_samples(str(path)):
            meta = json.loads(members["json"])
            meta["valid_frames"] = [40] * len(meta["clips"])
            del meta["frames"]
            rewritten.append((key, {**members, "json": json.dumps(meta).encode()}))
        path.unlink()
        shards.write_shard(rewritten, storage.locate(str(copy)), path.name)
    figure = preview_figure(str(copy), n_groups=1)
    clip_axes = [axis for axis in _spectrogram_axes(figure) if axis.get_title().startswith("c")]
    shift_s = folder_run.info["frame_shift_ms"] / 1000
    for axis in clip_axes:
        (padding,) = [patch for patch in axis.patches if patch.get_gid() == PADDING_GID]
        assert padding.get_x() == pytest.approx(40 * shift_s)


def test_sslam_inspect_writes_the_png(folder_run, tmp_path, capsys):
    out = tmp_path / "preview" / "groups.png"
    assert sslam(["inspect", str(folder_run.output), "--png", str(out), "--groups", "2"]) == 0
    assert out.read_bytes().startswith(b"\x89PNG") and out.stat().st_size > 10_000
    assert "lost 4 of its 4 clips" in capsys.readouterr().out
