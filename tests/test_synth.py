"""``medseqft synth``: the generated benchmark is valid nnU-Net raw data, deterministic, and site-annotated."""

import hashlib
import json
from multiprocessing.pool import ThreadPool
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_medseqft.cli import main as cli
from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.synth import default_datasets, generate, stale_datasets
from nnunetv2_medseqft.synth.datasets import resolve_out_dir
from nnunetv2_medseqft.synth.preview import write_preview
from nnunetv2_medseqft.synth.sites import SITES

EXPECTED = [
    (500, "Dataset500_MSFTPool", "pool"),
    (501, "Dataset501_MSFTLiver", "task"),
    (502, "Dataset502_MSFTSpleen", "task"),
    (503, "Dataset503_MSFTKidney", "task"),
    (504, "Dataset504_MSFTPancreas", "task"),
    (505, "Dataset505_MSFTLiverLesion", "unseen"),
    (506, "Dataset506_MSFTStomach", "unseen"),
]


def hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[int, Path]:
    return generate(tmp_path_factory.mktemp("raw"), preset="tiny", seed=0)


def test_default_datasets():
    assert [(d.dataset_id, d.name, d.role) for d in default_datasets()] == EXPECTED
    # fewer tasks: the unseen datasets directly follow the last task
    assert [(d.dataset_id, d.spec.key) for d in default_datasets(first_id=10, num_tasks=2)] == [
        (10, "MSFTPool"), (11, "MSFTLiver"), (12, "MSFTSpleen"), (13, "MSFTLiverLesion"), (14, "MSFTStomach"),
    ]  # fmt: skip
    for bad in ({"num_tasks": 0}, {"num_tasks": 5}, {"first_id": 0}, {"first_id": 995}):
        with pytest.raises(MedSeqFTError):
            default_datasets(**bad)


def test_layout(tiny):
    assert [(i, p.name) for i, p in tiny.items()] == [(i, name) for i, name, _ in EXPECTED]
    pool = tiny[500]
    image = sitk.ReadImage(str(pool / "imagesTr" / "MSFTPool_000_0000.nii.gz"))
    assert image.GetPixelID() == sitk.sitkInt16
    assert image.GetSpacing() == SITES["siteA"].spacing and image.GetSize() == (32, 32, 32)
    array = sitk.GetArrayFromImage(image)
    assert array.min() < -900 and array.max() > 300  # air around the body, bone inside


def test_passes_nnunet_verification(tiny, monkeypatch):
    from nnunetv2.experiment_planning import verify_dataset_integrity as vdi

    # nnU-Net's check spawns workers that each import torch (~10 s per dataset on 2 cores);
    # run the very same per-case checks in threads instead
    monkeypatch.setattr(
        vdi, "multiprocessing", SimpleNamespace(get_context=lambda _: SimpleNamespace(Pool=ThreadPool))
    )
    for folder in tiny.values():
        vdi.verify_dataset_integrity(str(folder), num_processes=2)


def test_labels_consecutive_and_foreground_in_every_case(tiny):
    for folder in tiny.values():
        dataset = json.loads((folder / "dataset.json").read_text())
        assert dataset["channel_names"] == {"0": "CT"} and dataset["file_ending"] == ".nii.gz"
        values = list(dataset["labels"].values())
        assert dataset["labels"]["background"] == 0 and values == list(range(len(values)))
        labels = sorted((folder / "labelsTr").glob("*.nii.gz"))
        assert len(labels) == dataset["numTraining"]
        for path in labels:
            label = sitk.ReadImage(str(path))
            assert label.GetPixelID() == sitk.sitkUInt8
            array = sitk.GetArrayFromImage(label)
            assert set(np.unique(array)) <= set(values), path
            assert array.any(), f"{path} has no foreground"


def test_organ_tasks_label_lesions_as_organ_and_old_labels_are_found(tiny, tmp_path):
    """Lesions are the unseen task's label; inside the organ tasks they count as organ (as liver does)."""
    labels = {i: json.loads((p / "dataset.json").read_text())["labels"] for i, p in tiny.items()}
    assert labels[503] == {"background": 0, "kidney": 1} and labels[505] == {"background": 0, "liver_lesion": 1}
    assert stale_datasets(tiny[500].parent) == []
    old = tmp_path / "Dataset503_MSFTKidney"  # data generated before the kidney task merged its lesions
    old.mkdir()
    (old / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "kidney": 1, "kidney_lesion": 2}}))
    assert stale_datasets(tmp_path) == ["Dataset503_MSFTKidney"]


def test_sites_sidecar(tiny):
    for dataset_id, name, role in EXPECTED:
        folder = tiny[dataset_id]
        sidecar = json.loads((folder / "sites.json").read_text())
        cases = {p.name.removesuffix(".nii.gz") for p in (folder / "labelsTr").iterdir()}
        assert set(sidecar["cases"]) == cases, name
        assert sidecar["pool_sites"] == ["siteA", "siteB"]
        assert set(sidecar["sites"]) >= set(sidecar["cases"].values())
        sites = set(sidecar["cases"].values())
        pool_like = [s for s in sidecar["cases"].values() if s in sidecar["pool_sites"]]
        if role == "pool":
            assert sites == {"siteA", "siteB"}
        elif role == "task":
            assert sites == {"siteA", "siteB", "siteC"} and len(pool_like) == len(cases) // 2
        else:
            assert sites == {"siteD"}
        # the site decides the stored spacing
        for case, site in list(sidecar["cases"].items())[:2]:
            image = sitk.ReadImage(str(folder / "imagesTr" / f"{case}_0000.nii.gz"))
            assert image.GetSpacing() == pytest.approx(SITES[site].spacing)


def test_deterministic_per_seed(tiny, tmp_path):
    again = generate(tmp_path / "same", preset="tiny", seed=0)
    assert hashes(tiny[500].parent) == hashes(again[500].parent)

    other = hashes(generate(tmp_path / "other", preset="tiny", seed=1)[500].parent)
    reference = hashes(tiny[500].parent)
    images = [k for k in reference if "imagesTr" in k]
    assert images and all(reference[k] != other[k] for k in images)


def test_refuses_existing_ids_unless_overwrite(tmp_path):
    keep = tmp_path / "Dataset499_Keep"
    keep.mkdir()
    (keep / "dataset.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    args = ["synth", "--out", str(tmp_path), "--preset", "tiny", "--num-tasks", "1"]
    assert cli.main(args) == 0
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    before_hashes = hashes(tmp_path)

    with pytest.raises(MedSeqFTError, match="--overwrite"):
        generate(tmp_path, preset="tiny", num_tasks=1)
    assert cli.main(args) != 0
    (tmp_path / "Dataset512_Foreign").mkdir()  # an id we would write, under another name, also blocks
    assert cli.main([*args, "--first-id", "510"]) != 0
    (tmp_path / "Dataset512_Foreign").rmdir()
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    assert hashes(tmp_path) == before_hashes

    (tmp_path / "Dataset501_MSFTLiver" / "stale.txt").write_text("stale")
    (tmp_path / "Dataset502_Foreign").mkdir()  # same id as a dataset we write: replaced too
    assert cli.main([*args, "--overwrite", "--seed", "3"]) == 0
    assert not (tmp_path / "Dataset501_MSFTLiver" / "stale.txt").exists()
    after = hashes(tmp_path)
    assert after["notes.txt"] == before_hashes["notes.txt"]
    assert after["Dataset499_Keep/dataset.json"] == before_hashes["Dataset499_Keep/dataset.json"]
    changed = [k for k in after if "imagesTr" in k and after[k] != before_hashes[k]]
    assert changed and sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "Dataset499_Keep", "Dataset500_MSFTPool", "Dataset501_MSFTLiver",
        "Dataset502_MSFTLiverLesion", "Dataset503_MSFTStomach",
    ]  # fmt: skip


def test_out_dir_defaults_to_nnunet_raw(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    assert resolve_out_dir(None) == tmp_path
    monkeypatch.delenv("nnUNet_raw")
    with pytest.raises(MedSeqFTError, match="nnUNet_raw"):
        generate(None)
    assert cli.main(["synth", "--preset", "tiny"]) != 0
    assert "--out" in capsys.readouterr().err


def test_preview(tiny, tmp_path):
    png = write_preview([tiny[500], tiny[503]], tmp_path / "preview.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cpu_preset_gives_every_fold_enough_validation_cases_from_both_kinds_of_site():
    """nnU-Net's own 5-fold split (sorted case ids, seed 12345) of every task and unseen dataset at --preset cpu:
    >= 5 validation cases in folds 0 and 1, and in the tasks both pool-site and shifted-site cases."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    from nnunetv2_medseqft.synth.datasets import PRESETS, TASKS, UNSEEN, case_sites
    from nnunetv2_medseqft.synth.sites import POOL_SITES

    n = PRESETS["cpu"].cases
    for spec in (*TASKS, *UNSEEN):
        sites = {f"{spec.key}_{i:03d}": s for i, s in enumerate(case_sites(spec, n))}
        splits = generate_crossval_split(sorted(sites), seed=12345, n_splits=5)
        for fold in (0, 1):
            val = splits[fold]["val"]
            assert len(val) >= 5, (spec.key, fold, val)
            if spec.role == "task":
                assert {sites[c] in POOL_SITES for c in val} == {True, False}, (spec.key, fold, val)
