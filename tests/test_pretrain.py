"""MedSeqFTPretrainTrainer: a real tiny nnUNetv2_train run on generated data, and its checkpoint."""

import json
import shutil

import pytest
import torch
from conftest import FIRST_TASK_ID, POOL_ID
from nnunet_helpers import run, run_python

from nnunetv2_medseqft.cpu_precision import cpu_bf16
from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.method.ssl import SSLSettings


def test_reconstruction_loss_decreases(tiny_foundation):
    log = torch.load(tiny_foundation, map_location="cpu", weights_only=False)["logging"]
    train = log["train_losses"]
    assert len(train) >= 4
    # first epoch starts from random init; the last two epochs must be clearly better
    assert max(train[-2:]) < 0.8 * train[0], train
    assert log["mean_fg_dice"][-1] > 0.0, "reconstruction score must beat predicting the intensity mean"


def test_checkpoint_records_ssl_settings_and_head(tiny_foundation):
    ckpt = torch.load(tiny_foundation, map_location="cpu", weights_only=False)
    section = ckpt["medseqft"]
    assert section["role"] == "foundation"
    assert SSLSettings.from_dict(section["ssl"]) == SSLSettings()
    # reconstruction head: one output per input channel (CT: 1), at every decoder stage
    heads = [k for k in ckpt["network_weights"] if ".seg_layers." in k and k.endswith("weight")]
    assert heads and all(ckpt["network_weights"][k].shape[0] == 1 for k in heads)
    assert ckpt["trainer_name"] == "MedSeqFTPretrainTrainer_tiny"
    # bf16 steps where this CPU computes bf16 (MEDSEQFT_CPU_BF16=auto), and the log says which
    assert section["cpu_bf16"] is cpu_bf16(torch.device("cpu"))
    log = "".join(p.read_text() for p in tiny_foundation.parent.glob("training_log_*.txt"))
    assert ("bf16 mixed precision on this CPU" in log) is section["cpu_bf16"]
    summary = json.loads((tiny_foundation.parent / "validation" / "ssl_validation.json").read_text())
    assert summary["cases"] and all(v["masked_mse"] > 0 for v in summary["cases"].values())


def test_foundation_loads_with_stock_pretrained_weights(nnunet, planned_pool, tiny_foundation):
    """Plan a generated task with the pool's plans (nnU-Net's move-plans route) and load the foundation
    into a stock nnUNetTrainer exactly as ``nnUNetv2_train ... -pretrained_weights`` does."""
    task_raw = next(nnunet.raw.glob(f"Dataset{FIRST_TASK_ID}_*"))
    task_pre = nnunet.preprocessed / task_raw.name
    task_pre.mkdir(parents=True, exist_ok=True)
    shutil.copy(task_raw / "dataset.json", task_pre / "dataset.json")
    run(["nnUNetv2_move_plans_between_datasets", "-s", str(POOL_ID), "-t", str(FIRST_TASK_ID),
         "-sp", "nnUNetPlans", "-tp", "FoundationPlans"], nnunet)
    run(["nnUNetv2_preprocess", "-d", str(FIRST_TASK_ID), "-plans_name", "FoundationPlans", "-c", "3d_fullres",
         "-np", "2"], nnunet)
    code = f"""
import torch
from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint
t = get_trainer_from_args("{FIRST_TASK_ID}", "3d_fullres", 0, "nnUNetTrainer", "FoundationPlans", device=torch.device("cpu"))
maybe_load_checkpoint(t, False, False, r"{tiny_foundation}")
pre = torch.load(r"{tiny_foundation}", map_location="cpu", weights_only=False)["network_weights"]
mine = t.network.state_dict()
body = [k for k in mine if ".seg_layers." not in k]
assert all(torch.equal(mine[k], pre[k]) for k in body), "body weights differ"
heads = [k for k in mine if ".seg_layers." in k and k.endswith("weight")]
assert all(mine[k].shape[0] == t.label_manager.num_segmentation_heads for k in heads)
assert t.label_manager.num_segmentation_heads != pre[heads[0]].shape[0]
print("LOADED", len(body))
"""
    out = run_python(code, nnunet).stdout
    assert "LOADED" in out


def _plans_with(configs: dict) -> dict:
    return {"plans_name": "p", "dataset_name": "Dataset999_X", "configurations": configs}


def test_plans_without_3d_fullres_give_clear_error():
    from nnunetv2_medseqft.trainers.pretrain import MedSeqFTPretrainTrainer

    with pytest.raises(MedSeqFTError, match="no configuration '3d_fullres'.*use 3d_fullres"):
        MedSeqFTPretrainTrainer(_plans_with({"2d": {"patch_size": [64, 64]}}), "3d_fullres", 0, {},
                                torch.device("cpu"))
    with pytest.raises(MedSeqFTError, match="2D patch size"):
        MedSeqFTPretrainTrainer(_plans_with({"2d": {"patch_size": [64, 64]}}), "2d", 0, {}, torch.device("cpu"))


def test_ssl_settings_validation():
    with pytest.raises(MedSeqFTError, match="mask_ratio"):
        SSLSettings(mask_ratio=1.5)
    with pytest.raises(MedSeqFTError, match="Unknown SSLSettings keys"):
        SSLSettings.from_dict({"mask_ration": 0.5})
