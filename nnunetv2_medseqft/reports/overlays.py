"""What a reader of a report wants to see next to the numbers: the segmentation itself, and Dice per site.

Evaluation (``evaluation.validation.ValidationSet.score(..., overlay=...)``) leaves ``overlays/<dataset>.npz`` in the run
folder: the first validation case's axial slice with the most ground truth (raw image, ground truth and
the exported model's prediction). This module draws them, and splits each task's Dice by the acquisition
site that ``sites.json`` (written by ``medseqft synth``) names for every case.
"""

from __future__ import annotations

import os

import numpy as np

OVERLAY_FOLDER = "overlays"
FIGSIZE, DPI = (9.0, 3.2), 100  # 900 x 320 pixels, whatever the image size


def overlay_file(run_folder: str, dataset: str) -> str:
    return os.path.join(run_folder, OVERLAY_FOLDER, f"{dataset}.npz")


def plot_overlay(npz_path: str, png_path: str, title: str) -> str | None:
    """Three panels: the image, the ground truth over it, the prediction over it (labels in colour)."""
    if not os.path.isfile(npz_path):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with np.load(npz_path) as z:
        image, gt, pred, case = z["image"], z["gt"], z["pred"], str(z["case"])
    lo, hi = np.percentile(image, [1, 99])
    labels = max(int(gt.max()), int(pred.max()), 1)
    fig, axes = plt.subplots(1, 3, figsize=FIGSIZE, dpi=DPI)
    for ax, mask, name in zip(axes, (None, gt, pred), ("image", "ground truth", "prediction")):
        ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, origin="lower")
        if mask is not None:
            shown = np.ma.masked_where(mask == 0, mask)
            ax.imshow(shown, cmap="autumn" if labels == 1 else "tab10", alpha=0.45, vmin=1, vmax=max(labels, 2),
                      origin="lower", interpolation="nearest")
            if mask.any():
                ax.contour(mask > 0, levels=[0.5], colors="cyan", linewidths=0.8)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{title}: {case}", fontsize=10)
    fig.savefig(png_path, dpi=DPI)  # no bbox_inches: every figure has the same pixel size
    plt.close(fig)
    return png_path


def dice_per_site(scores: dict, sites: dict[str, str]) -> dict[str, dict]:
    """Site -> {"dice": mean case Dice, "cases": n} for the cases of ``scores['per_case']`` with a known site."""
    by_site: dict[str, list[float]] = {}
    for case, dice in (scores.get("per_case") or {}).items():
        if case in sites and dice is not None:
            by_site.setdefault(sites[case], []).append(dice)
    return {site: {"dice": float(np.mean(v)), "cases": len(v)} for site, v in sorted(by_site.items())}
