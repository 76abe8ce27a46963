"""PNG overview of written datasets: axial + coronal slices with label contours.

Reads the NIfTI files back, so it shows what nnU-Net will see (spacing, stored HU, site shifts).
"""

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

WINDOW = (-160.0, 240.0)  # abdominal soft-tissue window (level 40, width 400)
CONTOUR_COLORS = ("#ff3b30", "#ffcc00", "#34c759")


def _pick_cases(folder: Path, per_dataset: int) -> list[tuple[str, str]]:
    """(case, site) pairs, preferring one case per distinct site so site shifts are visible."""
    cases = json.loads((folder / "sites.json").read_text())["cases"]
    picked, seen = [], set()
    for case, site in cases.items():
        if site not in seen:
            picked.append((case, site))
            seen.add(site)
    picked += [item for item in cases.items() if item not in picked]
    return picked[:per_dataset]


def _read(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image.GetSpacing()


def write_preview(folders: Iterable[str | Path], png: str | Path, cases_per_dataset: int = 2) -> Path:
    """One row per dataset; for each picked case an axial and a coronal slice through the label's centre."""
    import matplotlib

    matplotlib.use("Agg")  # headless; must precede pyplot
    import matplotlib.pyplot as plt

    folders = [Path(f) for f in folders]
    cols = 2 * cases_per_dataset
    fig, axes = plt.subplots(len(folders), cols, figsize=(2.6 * cols, 2.7 * len(folders)), squeeze=False)
    for row, folder in zip(axes, folders, strict=True):
        picks = _pick_cases(folder, cases_per_dataset)
        for col, (case, site) in enumerate(picks):
            image, (sx, _, sz) = _read(folder / "imagesTr" / f"{case}_0000.nii.gz")
            label, _ = _read(folder / "labelsTr" / f"{case}.nii.gz")
            zc, yc, _ = (np.argwhere(label > 0).mean(0) if label.any() else np.array(label.shape) / 2).astype(
                int
            )
            views = (
                ("axial", image[zc], label[zc], sx, "upper"),
                ("coronal", image[:, yc], label[:, yc], sz, "lower"),
            )
            for ax, (view, img, lab, row_spacing, origin) in zip(
                row[2 * col : 2 * col + 2], views, strict=True
            ):
                ax.imshow(
                    img, cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], origin=origin, aspect=row_spacing / sx
                )
                for value, color in zip(range(1, int(lab.max()) + 1), CONTOUR_COLORS, strict=False):
                    if (lab == value).any():
                        ax.contour(lab == value, levels=[0.5], colors=color, linewidths=0.8)
                ax.set_title(f"{folder.name}\n{case} {site} {view}", fontsize=6, color="white")
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110, facecolor="black")
    plt.close(fig)
    return png
