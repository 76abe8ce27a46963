"""MedSeqFTPlanner / ``medseqft plan``: downstream plans identical to the foundation's, usable by stock nnU-Net."""

import json

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
