"""Scores of a classifier on labelled clips: average precision per class, mAP (SSLAM_SPEC §11), accuracy.

Used by the linear probe (jobs.evaluate) and by fine-tuning's evaluation (jobs.finetune, jobs.train.finetune_data).
"""

from __future__ import annotations

import numpy as np


def average_precision_per_class(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """sklearn's average precision of each class; NaN for a class without a positive clip."""
    from sklearn.metrics import average_precision_score

    per_class = np.full(labels.shape[1], np.nan)
    for k in range(labels.shape[1]):
        if labels[:, k].any():
            per_class[k] = average_precision_score(labels[:, k], scores[:, k])
    return per_class


def mean_average_precision(labels: np.ndarray, scores: np.ndarray) -> tuple[float, int]:
    """(nanmean over classes of sklearn's average precision, number of classes scored); classes without a
    positive clip give NaN and are skipped (SSLAM_SPEC §11)."""
    per_class = average_precision_per_class(labels, scores)
    scored = int(np.isfinite(per_class).sum())
    return (float(np.nanmean(per_class)) if scored else float("nan")), scored


def accuracy(labels: np.ndarray, scores: np.ndarray) -> float:
    return float((scores.argmax(axis=1) == labels.argmax(axis=1)).mean())
