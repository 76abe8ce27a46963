"""MedSeqFTPlanner / ``medseqft plan``: downstream plans identical to the foundation's, usable by stock nnU-Net."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIRST_TASK_ID
from nnunet_helpers import run, run_python

from nnunetv2_medseqft.checkpoints import sha256_file
from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.method.foundation import ARCHITECTURE_FIELDS, architecture_mismatches, load_foundation


def test_plans_identical_to_foundation_in_architecture_fields(planned_task, tiny_foundation):
    plans = json.loads((planned_task.preprocessed / "MedSeqFTPlans.json").read_text())
    foundation = load_foundation(str(tiny_foundation))
    assert architecture_mismatches(plans, "3d_fullres", foundation.plans, foundation.configuration) == []
    ours, theirs = plans["configurations"]["3d_fullres"], foundation.plans["configurations"]["3d_fullres"]
    assert all(ours[f] == theirs[f] for f in ARCHITECTURE_FIELDS)
    assert plans["foreground_intensity_properties_per_channel"] == \
        foundation.plans["foreground_intensity_properties_per_channel"]
    assert plans["dataset_name"] == planned_task.dataset_name and plans["plans_name"] == "MedSeqFTPlans"
    assert ours["preprocessor_name"] == "DefaultPreprocessor"
    section = plans["medseqft"]
    assert section["foundation"]["sha256"] == sha256_file(str(tiny_foundation))
    assert section["mds"]["k_frac"] == 0.2
    assert (planned_task.preprocessed / "MedSeqFTPlans_3d_fullres").is_dir()


def test_stock_training_with_foundation_weights_on_planned_task(planned_task, tiny_foundation):
    """Stock nnUNetTrainer + -pretrained_weights on the planned task: the loading and one real training step."""
    code = f"""
import torch
from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint
t = get_trainer_from_args("{FIRST_TASK_ID}", "3d_fullres", 0, "nnUNetTrainer", "MedSeqFTPlans", device=torch.device("cpu"))
maybe_load_checkpoint(t, False, False, r"{tiny_foundation}")
t.num_iterations_per_epoch = 1
t.on_train_start()
out = t.train_step(next(t.dataloader_train))
print("LOSS", float(out["loss"]))
t.on_train_end()
"""
    out = run_python(code, planned_task.folders).stdout
    loss = float(out.split("LOSS")[-1].split()[0])
    assert torch.isfinite(torch.tensor(loss))


def test_plain_segmentation_checkpoint_is_not_a_foundation(tmp_path, tiny_foundation):
    ckpt = torch.load(tiny_foundation, map_location="cpu", weights_only=False)
    del ckpt["medseqft"]
    torch.save(ckpt, tmp_path / "seg.pth")
    with pytest.raises(MedSeqFTError, match="not a MedSeqFT foundation.*MedSeqFTPretrainTrainer"):
        load_foundation(str(tmp_path / "seg.pth"))


def test_missing_and_corrupt_foundation(tmp_path):
    with pytest.raises(MedSeqFTError, match="not found"):
        load_foundation(str(tmp_path / "nope.pth"))
    (tmp_path / "bad.pth").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(MedSeqFTError, match="unreadable or truncated"):
        load_foundation(str(tmp_path / "bad.pth"))


def test_channel_mismatch_is_refused(nnunet, tiny_foundation, tmp_path):
    """A dataset with two channels (or another modality) cannot use a one-channel CT foundation."""
    from nnunetv2_medseqft.method.foundation import check_channels

    foundation = load_foundation(str(tiny_foundation))
    with pytest.raises(MedSeqFTError, match="2 input channel"):
        check_channels(foundation, {"channel_names": {"0": "CT", "1": "CT"}}, "Dataset9_X")
    with pytest.raises(MedSeqFTError, match="modality differs"):
        check_channels(foundation, {"channel_names": {"0": "T2"}}, "Dataset9_X")


def test_plan_cli_unknown_dataset(nnunet, tiny_foundation):
    proc = run(["medseqft", "plan", "-d", "987", "--foundation", str(tiny_foundation)], nnunet, check=False)
    assert proc.returncode == 2 and "Unknown dataset 987" in proc.stderr


def test_stock_plan_and_preprocess_leaves_mds_buffers(planned_task, tiny_foundation, monkeypatch):
    """``nnUNetv2_plan_and_preprocess -pl MedSeqFTPlanner`` ends with the buffers of the chosen folds next to
    splits_final.json, valid for medseqft select and the trainers (same key: they reuse them)."""
    from nnunetv2_medseqft.method.buffer import load_buffer

    nnunet, plans = planned_task.folders, "MedSeqFTPlans_stock"
    monkeypatch.setenv("MEDSEQFT_FOUNDATION", str(tiny_foundation))
    monkeypatch.setenv("MEDSEQFT_MDS_FOLDS", "0")
    run(["medseqft", "register"], nnunet)  # -pl needs the planner shim in nnunetv2's folder
    out = run(["nnUNetv2_plan_and_preprocess", "-d", str(FIRST_TASK_ID), "-pl", "MedSeqFTPlanner", "-c", "3d_fullres",
               "-np", "2", "-overwrite_plans_name", plans], nnunet).stdout
    assert "MDS buffers" in out
    for var, folder in (("nnUNet_raw", nnunet.raw), ("nnUNet_preprocessed", nnunet.preprocessed),
                        ("nnUNet_results", nnunet.results)):
        monkeypatch.setenv(var, str(folder))
    record = load_buffer(planned_task.dataset_name, 0, plans)  # raises when missing or made with other inputs
    assert len(record["buffer"]) == record["k"] >= 1
    assert set(record["buffer"]) <= set(record["key"]["training_cases"])
    assert not (planned_task.preprocessed / f"mds_buffer__{plans}__3d_fullres__fold1.json").exists()  # only fold 0


def _broken_copy(nnunet, source_id: int, target: str) -> Path:
    """A copy of a generated raw dataset under another id (the session's datasets stay intact)."""
    import shutil

    source = next(nnunet.raw.glob(f"Dataset{source_id}_*"))
    folder = nnunet.raw / target
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(source, folder)
    return folder


def test_broken_cases_are_named_before_planning(nnunet, tiny_foundation):
    """Undeclared label values (nnU-Net trains on them silently), NaN and infinite intensities: each case is
    named with its problem, and nothing is planned."""
    import SimpleITK as sitk

    folder = _broken_copy(nnunet, 501, "Dataset961_BrokenLiver")
    # as .mha: SimpleITK's NIfTI reader turns NaN and inf into 0, so they must be stored in a format that keeps them
    for path in sorted(folder.glob("*Tr/*.nii.gz")):
        sitk.WriteImage(sitk.ReadImage(str(path)), str(path).replace(".nii.gz", ".mha"))
        path.unlink()
    dataset_json = json.loads((folder / "dataset.json").read_text())
    (folder / "dataset.json").write_text(json.dumps({**dataset_json, "file_ending": ".mha"}))
    labels, images = sorted((folder / "labelsTr").iterdir()), sorted((folder / "imagesTr").iterdir())

    def edit(path, change):
        image = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(image)
        array = array.astype(np.float32) if "imagesTr" in str(path) else array
        change(array)
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(image)
        sitk.WriteImage(out, str(path))

    edit(labels[0], lambda a: a.__setitem__((0, 0, 0), 7))
    edit(images[1], lambda a: a.__setitem__((1, 1, 1), np.nan))
    edit(images[2], lambda a: a.__setitem__((1, 1, 1), np.inf))
    proc = run(["medseqft", "plan", "-d", "961", "--foundation", str(tiny_foundation)], nnunet, check=False)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    assert "3 of" in err and "training cases are broken" in err and "Traceback" not in err, err
    assert f"{labels[0].stem}: the label file holds values [7] that dataset.json does not declare " \
           "(declared: [0, 1])" in err, err
    assert f"{images[1].name[:-len('_0000.mha')]}: Images contain NaN" in err, err
    assert f"{images[2].name[:-len('_0000.mha')]}: the image holds infinite values" in err, err
    assert not (nnunet.preprocessed / "Dataset961_BrokenLiver").exists()


def test_cases_smaller_than_the_patch_are_warned_about(nnunet, tiny_foundation):
    """Geometry the foundation's plans serve badly trains, but never silently."""
    import SimpleITK as sitk

    folder = _broken_copy(nnunet, 501, "Dataset962_ThinLiver")
    for sub in ("imagesTr", "labelsTr"):
        for path in sorted((folder / sub).iterdir())[:2]:
            image = sitk.ReadImage(str(path))
            sitk.WriteImage(image[:, :, :4], str(path))  # 4 slices
    proc = run(["medseqft", "plan", "-d", "962", "--foundation", str(tiny_foundation)], nnunet)
    assert "WARNING Dataset962_ThinLiver: 2 of" in proc.stdout and "smaller than half the foundation's patch" in \
        proc.stdout, proc.stdout


def test_stock_planner_names_an_undeclared_label_before_planning(nnunet, tiny_foundation, monkeypatch):
    """``nnUNetv2_plan_and_preprocess -pl MedSeqFTPlanner`` checks the cases like ``medseqft plan`` does."""
    import SimpleITK as sitk

    folder = _broken_copy(nnunet, 501, "Dataset963_UndeclaredLiver")
    label = sorted((folder / "labelsTr").iterdir())[0]
    image = sitk.ReadImage(str(label))
    array = sitk.GetArrayFromImage(image)
    array[0, 0, 0] = 5
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    sitk.WriteImage(out, str(label))
    monkeypatch.setenv("MEDSEQFT_FOUNDATION", str(tiny_foundation))
    run(["medseqft", "register"], nnunet)
    proc = run(["nnUNetv2_plan_and_preprocess", "-d", "963", "-pl", "MedSeqFTPlanner", "-c", "3d_fullres", "-np", "2"],
               nnunet, check=False)
    assert proc.returncode != 0
    assert "values [5] that dataset.json does not declare" in proc.stdout + proc.stderr, proc.stderr[-2000:]
    assert not (nnunet.preprocessed / "Dataset963_UndeclaredLiver" / "MedSeqFTPlans.json").exists()
