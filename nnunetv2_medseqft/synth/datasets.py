"""Which datasets and cases the benchmark has, and writing them as nnU-Net v2 raw datasets.

Each dataset folder holds ``imagesTr/CASE_0000.nii.gz`` (int16 HU), ``labelsTr/CASE.nii.gz`` (uint8),
``dataset.json`` and a ``sites.json`` sidecar naming the acquisition site of every case.
Every case is a full abdomen; a dataset only decides which tissues become its labels.
"""

import json
import os
import re
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.synth.anatomy import BODY_TISSUES, TISSUE_ID, TISSUES, render, sample_anatomy
from nnunetv2_medseqft.synth.shapes import Grid
from nnunetv2_medseqft.synth.sites import POOL_SITES, SHIFTED_SITE, SITES, UNSEEN_SITE, Site, acquire


@dataclass(frozen=True)
class DatasetSpec:
    key: str  # folder suffix; its catalogue position also keys the random stream
    role: str  # "pool" | "task" | "unseen"
    labels: dict[str, tuple[str, ...]]  # label name -> tissues; values 1, 2, ... in this order
    description: str
    min_liver_lesions: int = 0


CATALOGUE = (
    DatasetSpec(
        "MSFTPool", "pool", {"body": BODY_TISSUES}, "pre-training pool (sites A/B); label = body mask"
    ),
    DatasetSpec("MSFTLiver", "task", {"liver": ("liver", "liver_lesion")}, "task 1: liver incl. lesions"),
    DatasetSpec("MSFTSpleen", "task", {"spleen": ("spleen",)}, "task 2: spleen"),
    # organ tasks label their lesions as organ (a rare second class kept the kidney from being learned at all
    # at the CPU budget: benchmarks/results/scale-tasks-2026-12-03.txt); lesions are the unseen task's label
    DatasetSpec("MSFTKidney", "task", {"kidney": ("kidney", "kidney_lesion")}, "task 3: kidneys incl. lesions"),
    DatasetSpec("MSFTPancreas", "task", {"pancreas": ("pancreas",)}, "task 4: pancreas"),
    DatasetSpec(
        "MSFTLiverLesion",
        "unseen",
        {"liver_lesion": ("liver_lesion",)},
        "unseen: liver lesions (site D)",
        min_liver_lesions=1,
    ),
    DatasetSpec("MSFTStomach", "unseen", {"stomach": ("stomach",)}, "unseen: stomach (site D)"),
)
POOL = CATALOGUE[0]
TASKS = tuple(s for s in CATALOGUE if s.role == "task")
UNSEEN = tuple(s for s in CATALOGUE if s.role == "unseen")


@dataclass(frozen=True)
class Preset:
    cases: int  # per task / unseen dataset
    pool_cases: int
    fov_mm: float  # cubic field of view; the phantom is scaled to it, so shapes are ~fov / spacing voxels


# tiny: unit tests (seconds). cpu: the CPU benchmark scale (>= 5 validation cases in every 5-fold
# split; learns within minutes with MedSeqFTCPUPlanner's plans). bench: GPU scale.
PRESETS = {"tiny": Preset(8, 16, 64.0), "cpu": Preset(25, 40, 128.0), "bench": Preset(24, 48, 128.0)}
DEFAULT_FIRST_ID = 500
MAX_DRAWS = 20


@dataclass(frozen=True)
class PlannedDataset:
    dataset_id: int
    spec: DatasetSpec

    @property
    def name(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.spec.key}"

    @property
    def role(self) -> str:
        return self.spec.role


def default_datasets(first_id: int = DEFAULT_FIRST_ID, num_tasks: int = len(TASKS)) -> list[PlannedDataset]:
    """Pool at ``first_id``, then ``num_tasks`` sequential tasks, then the 2 unseen tasks (consecutive ids)."""
    if not 1 <= num_tasks <= len(TASKS):
        raise MedSeqFTError(f"num_tasks={num_tasks} is out of range: use 1 to {len(TASKS)}")
    last_id = first_id + num_tasks + len(UNSEEN)
    if first_id < 1 or last_id > 999:
        raise MedSeqFTError(
            f"dataset ids {first_id}..{last_id} do not fit nnU-Net's 1..999: choose a first id between 1 and {999 - num_tasks - len(UNSEEN)}"
        )
    specs = (POOL, *TASKS[:num_tasks], *UNSEEN)
    return [PlannedDataset(first_id + i, spec) for i, spec in enumerate(specs)]


def case_sites(spec: DatasetSpec, num_cases: int) -> list[str]:
    """Pool: sites A/B alternating. Tasks: every other case from the shifted site C. Unseen: site D."""
    if spec.role == "unseen":
        return [UNSEEN_SITE] * num_cases
    if spec.role == "pool":
        return [POOL_SITES[i % 2] for i in range(num_cases)]
    return [SHIFTED_SITE if i % 2 else POOL_SITES[(i // 2) % 2] for i in range(num_cases)]


def resolve_out_dir(out_dir: str | os.PathLike | None) -> Path:
    """``out_dir``, else $nnUNet_raw."""
    out = out_dir or os.environ.get("nnUNet_raw")
    if not out:
        raise MedSeqFTError(
            "no output folder: pass --out DIR (out_dir=...) or set the nnUNet_raw environment variable"
        )
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MedSeqFTError(f"output path {out} is a file: pass a folder to --out")
    return out


def colliding_folders(out: Path, planned: list[PlannedDataset]) -> list[Path]:
    """Existing ``DatasetXXX_*`` folders in ``out`` whose id is one we are about to write."""
    ids = {ds.dataset_id for ds in planned}
    if not out.is_dir():
        return []
    return sorted(
        child
        for child in out.iterdir()
        if child.is_dir() and (m := re.fullmatch(r"Dataset(\d{3})_.+", child.name)) and int(m[1]) in ids
    )


def dataset_labels(spec: DatasetSpec) -> dict[str, int]:
    """The ``labels`` of a generated dataset.json."""
    return {"background": 0, **{name: v for v, name in enumerate(spec.labels, start=1)}}


def stale_datasets(out_dir: str | os.PathLike, first_id: int = DEFAULT_FIRST_ID) -> list[str]:
    """Generated folders in ``out_dir`` whose labels are not the ones the catalogue writes today (data made
    before a label change): reusing them would mix two benchmarks."""
    stale = []
    for ds in default_datasets(first_id):
        path = Path(out_dir) / ds.name / "dataset.json"
        if path.is_file():
            labels = json.loads(path.read_text())["labels"]
            if labels != dataset_labels(ds.spec):
                stale.append(ds.name)
    return stale


def generate(
    out_dir: str | os.PathLike | None = None,
    preset: str = "tiny",
    seed: int = 0,
    first_id: int = DEFAULT_FIRST_ID,
    num_tasks: int = len(TASKS),
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[int, Path]:
    """Write all benchmark datasets into ``out_dir`` (default $nnUNet_raw); returns {dataset id: folder}.

    Same arguments give byte-identical files. Existing folders with any of our dataset ids are an
    error unless ``overwrite``, which replaces just those folders.
    """
    if preset not in PRESETS:
        raise MedSeqFTError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
    if not isinstance(seed, int) or seed < 0:
        raise MedSeqFTError(f"seed must be a non-negative integer, got {seed!r}")
    out = resolve_out_dir(out_dir)
    planned = default_datasets(first_id, num_tasks)
    collisions = colliding_folders(out, planned)
    if collisions and not overwrite:
        names = ", ".join(c.name for c in collisions)
        raise MedSeqFTError(
            f"{out} already contains dataset ids we would write ({names}): pass --overwrite to replace them, "
            "or choose another --first-id / --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    for folder in collisions:
        shutil.rmtree(folder)

    written = {}
    for ds in planned:
        written[ds.dataset_id] = _write_dataset(out / ds.name, ds, preset, seed)
        if log:
            log(f"wrote {written[ds.dataset_id]}")
    return written


def _write_dataset(folder: Path, ds: PlannedDataset, preset_name: str, seed: int) -> Path:
    spec, preset = ds.spec, PRESETS[preset_name]
    sites = case_sites(spec, preset.pool_cases if spec.role == "pool" else preset.cases)
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    lut = np.zeros(len(TISSUES), dtype=np.uint8)  # tissue id -> this dataset's label value
    for value, tissues in enumerate(spec.labels.values(), start=1):
        lut[[TISSUE_ID[t] for t in tissues]] = value

    cases = {f"{spec.key}_{i:03d}": site for i, site in enumerate(sites)}

    def write_case(i: int, case: str, site_name: str) -> None:
        # one stream per case, keyed by catalogue position (not dataset id) so ids don't change the data;
        # cases are independent, so threads (numpy/scipy/ITK release the GIL) keep files deterministic
        rng = np.random.default_rng([seed, CATALOGUE.index(spec), i])
        image, label, grid = _make_case(spec, lut, SITES[site_name], preset.fov_mm, rng)
        _write_nifti(image, grid, folder / "imagesTr" / f"{case}_0000.nii.gz")
        _write_nifti(label, grid, folder / "labelsTr" / f"{case}.nii.gz")

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(write_case, range(len(cases)), cases, cases.values()))  # list() re-raises errors

    dataset_json = {
        "name": ds.name,
        "description": f"medseqft synthetic CT benchmark, {spec.description}",
        "channel_names": {"0": "CT"},
        "labels": dataset_labels(spec),
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
        "medseqft": {"role": spec.role, "preset": preset_name, "seed": seed},
    }
    sidecar = {
        "role": spec.role,
        "cases": cases,
        "pool_sites": list(POOL_SITES),
        "sites": {name: site.as_json() for name, site in SITES.items()},
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2) + "\n")
    (folder / "sites.json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return folder


def _make_case(spec: DatasetSpec, lut: np.ndarray, site: Site, fov_mm: float, rng: np.random.Generator):
    grid = site.grid(fov_mm)
    # a small lesion can fall between the voxel centres of a coarse grid: redraw so that every case
    # has foreground (the stream is still deterministic)
    for _ in range(MAX_DRAWS):
        hu, tissue = render(sample_anatomy(rng, spec.min_liver_lesions), grid, rng)
        label = lut[tissue]
        if label.any():
            return acquire(hu, grid, site, rng), label, grid
    raise RuntimeError(f"{spec.key}: no foreground after {MAX_DRAWS} draws on {site.name}'s grid")


def _write_nifti(array: np.ndarray, grid: Grid, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(grid.spacing)
    image.SetOrigin(grid.origin)
    sitk.WriteImage(image, str(path), useCompression=True)
