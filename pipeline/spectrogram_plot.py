"""The one drawing of a log-mel spectrogram on a matplotlib axis, shared by `sslam inspect --png`
(`pipeline.inspect`) and the MLflow batch preview (`jobs.mlops.preview`): mel bins upwards, magma colours,
padding frames masked grey, time in frames or in seconds. Matplotlib is imported only when drawing."""

from __future__ import annotations

import numpy as np

PADDING_COLOUR = "0.6"


def draw_spectrogram(
    axis,
    values: np.ndarray,
    title: str,
    *,
    frame_s: float | None = None,
    padded: np.ndarray | None = None,
    norm=None,
    fontsize: float = 7,
):
    """Draw `values` (T frames, F mel bins) on `axis` and return the image.

    `frame_s` None: the x axis counts frames (pixel i centred on i); else it is time in seconds from 0 with
    frames of `frame_s`. `padded` (T,) bool masks those frames, drawn in PADDING_COLOUR. `norm` is a matplotlib
    Normalize (None: the image's own range). Labels are a point smaller than the title, ticks two.
    """
    from matplotlib import colormaps

    frames, bins = values.shape
    image = values.T
    if padded is not None:
        image = np.ma.masked_array(image, mask=np.broadcast_to(padded, image.shape))
    extent = None if frame_s is None else (0.0, frames * frame_s, 0.0, bins)
    colours = colormaps["magma"].with_extremes(bad=PADDING_COLOUR)
    drawn = axis.imshow(image, origin="lower", aspect="auto", cmap=colours, norm=norm, extent=extent,
                        interpolation="nearest")
    axis.set_title(title, fontsize=fontsize)
    axis.set_xlabel("frame" if frame_s is None else "time (s)", fontsize=fontsize - 1)
    axis.set_ylabel("mel bin", fontsize=fontsize - 1)
    axis.tick_params(labelsize=fontsize - 2)
    return drawn
