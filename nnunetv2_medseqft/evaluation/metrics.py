"""Scores: Dice and HD95 per case and label, their summary, and the continual-learning metrics of an R matrix."""

from __future__ import annotations

import warnings

import numpy as np
import torch


def dice_and_hd95(pred: np.ndarray, gt: np.ndarray, spacing) -> tuple[float, float] | None:
    """Dice (points) and HD95 (mm) of two boolean masks; None when both are empty (nothing to score)."""
    from monai.metrics import compute_hausdorff_distance

    p, g = pred.sum(), gt.sum()
    if p == 0 and g == 0:
        return None
    if p == 0 or g == 0:
        diagonal = float(np.sqrt(sum((n * s) ** 2 for n, s in zip(gt.shape, spacing))))
        return 0.0, diagonal
    dice = 200.0 * float(np.logical_and(pred, gt).sum()) / float(p + g)
    with warnings.catch_warnings():  # MONAI deprecation notices about its own internals
        warnings.simplefilter("ignore", FutureWarning)
        hd = compute_hausdorff_distance(torch.from_numpy(pred)[None, None], torch.from_numpy(gt)[None, None],
                                        include_background=True, percentile=95, spacing=[float(s) for s in spacing])
    return dice, float(hd.item())


def summarise(per_case: list[dict[str, tuple[float, float] | None]], case_ids: list[str] | None = None) -> dict:
    """Mean over cases per label (cases where the label is absent from both masks are left out, as nnU-Net's
    summary does), and the mean over the labels that were scored; with ``case_ids``, each case's mean Dice
    too (``per_case``: per-site tables are built from it)."""
    labels = list(per_case[0]) if per_case else []
    out = {}
    for name in labels:
        scored = [c[name] for c in per_case if c[name] is not None]
        out[name] = {"dice": float(np.mean([d for d, _ in scored])) if scored else None,
                     "hd95": float(np.mean([h for _, h in scored])) if scored else None, "cases": len(scored)}
    mean = {m: float(np.mean([v[m] for v in out.values() if v[m] is not None]))
            if any(v[m] is not None for v in out.values()) else None for m in ("dice", "hd95")}
    summary = {"mean": mean, "labels": out, "cases": len(per_case)}
    if case_ids is not None:
        summary["per_case"] = {
            case: (float(np.mean([v[0] for v in scores.values() if v is not None]))
                   if any(v is not None for v in scores.values()) else None)
            for case, scores in zip(case_ids, per_case)}
    return summary


def continual_metrics(r: list[list[float | None]]) -> dict:
    """ACC, BWT, FWT of an R matrix whose row 0 is the foundation and row i the body after task i."""
    t = len(r) - 1
    if t < 1 or any(v is None for row in r for v in row):
        return {"acc": None, "bwt": None, "fwt": None}
    acc = float(np.mean(r[t]))
    bwt = float(np.mean([r[t][j] - r[j + 1][j] for j in range(t - 1)])) if t > 1 else None
    fwt = float(np.mean([r[j][j] - r[0][j] for j in range(1, t)])) if t > 1 else None
    return {"acc": acc, "bwt": bwt, "fwt": fwt}


def encoder_bwt(r: list[list[float | None]], r_encoder: list[list[float | None]]) -> float | None:
    """BWT of the encoder alone: mean over j < T of r_encoder[T][j] - R[j][j], where r_encoder[T][j] is the final
    body's encoder with task j's own decoder and head (rows as in ``continual_metrics``)."""
    t = len(r) - 1
    if t < 2:
        return None
    pairs = [(r_encoder[t][j], r[j + 1][j]) for j in range(t - 1)]
    return None if any(a is None or b is None for a, b in pairs) else float(np.mean([a - b for a, b in pairs]))

