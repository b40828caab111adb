"""The PNG preview of a training batch that the tracker logs at the start of a run (jobs.mlops.tracking):
clean clips, their mixtures with the no-mix windows outlined, and one student mask."""

from __future__ import annotations

from pathlib import Path

import torch

from model.config import ModelConfig
from pipeline.spectrogram_plot import draw_spectrogram

PREVIEW_CLIPS = 3
FONT_SIZE = 8


def _runs(flags: torch.Tensor) -> list[tuple[int, int]]:
    """[start, stop) ranges of the True entries of a 1-D bool tensor."""
    ranges, start = [], None
    for index, flag in enumerate(flags.tolist() + [False]):
        if flag and start is None:
            start = index
        elif not flag and start is not None:
            ranges.append((start, index))
            start = None
    return ranges


def render_preview(batch: dict[str, torch.Tensor], model_cfg: ModelConfig, path: str | Path, seed: int = 0) -> Path:
    """PNG of a training batch: the first clean clips, their mixtures with the no-mix windows outlined (stage-2
    batches), and one student mask (model.masking.block_masks) over the first clip. Matplotlib's Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from model.masking import block_masks

    clean = batch["clean"].detach().float().cpu()[:, 0]
    count = min(PREVIEW_CLIPS, clean.shape[0])
    frames, bins = clean.shape[1:]
    patch = model_cfg.patch_size
    time_patches, freq_patches = frames // patch, bins // patch
    mixed = batch.get("mixed")
    rows = 3 if mixed is not None else 2
    figure = Figure(figsize=(4.0 * count, 2.4 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, count, squeeze=False)

    for i in range(count):
        draw_spectrogram(axes[0][i], clean[i].numpy(), f"clean clip {i}", fontsize=FONT_SIZE)
    if mixed is not None:
        mixed = mixed.detach().float().cpu()[:, 0]
        partner = batch.get("partner")
        nomix = batch.get("nomix")
        for i in range(count):
            foreign = f" + clip {int(partner[i])}" if partner is not None else ""
            title = f"mixture {i}{foreign}, no-mix windows outlined"
            draw_spectrogram(axes[1][i], mixed[i].numpy(), title, fontsize=FONT_SIZE)
            for start, stop in _runs(nomix[i].cpu()) if nomix is not None else []:
                axes[1][i].add_patch(
                    Rectangle((start * patch - 0.5, -0.5), (stop - start) * patch, bins, fill=False, edgecolor="cyan",
                              linewidth=1.5)
                )
    generator = torch.Generator().manual_seed(seed)
    mask = block_masks(1, time_patches, freq_patches, model_cfg, generator)[0].reshape(time_patches, freq_patches)
    cells = mask.repeat_interleave(patch, dim=0).repeat_interleave(patch, dim=1).float()
    mask_ax = axes[-1][0]
    title = f"student mask on clip 0 ({int(mask.sum())}/{mask.numel()} patches masked)"
    draw_spectrogram(mask_ax, clean[0].numpy(), title, fontsize=FONT_SIZE)
    mask_ax.imshow(cells.T.numpy(), origin="lower", aspect="auto", cmap="gray", alpha=0.55, interpolation="nearest")
    for ax in axes[-1][1:]:
        ax.axis("off")
    path = Path(path)
    figure.savefig(path, format="png", dpi=80)
    return path
