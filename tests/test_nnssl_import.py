"""nnssl checkpoints as M0: ``medseqft import-nnssl`` on checkpoints in nnssl's exact format (tests/nnssl_format.py),
then the plugin's own route with them: ``medseqft plan``, MDS with nnssl's objective, a MedSeqFT task step."""

import json
import shutil

import pytest
import torch
from conftest import FIRST_TASK_ID
from nnssl_format import NNSSL_RESENC_L, adaptation_plan, resenc, serialized, tiny_resenc_kwargs, write_checkpoint
from nnunet_helpers import run

from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.method import nnssl_import
from nnunetv2_medseqft.method.foundation import load_foundation

MR_TASK_ID = 519  # the first task's images, declared as MR: an MR task for the (MR) nnssl foundation
PLANS = "MedSeqFTPlans_nnssl"


@pytest.fixture(scope="module")
def mr_task(nnunet):
    src = next(nnunet.raw.glob(f"Dataset{FIRST_TASK_ID}_*"))
    dst = nnunet.raw / f"Dataset{MR_TASK_ID}_LiverMR"
    shutil.copytree(src, dst, symlinks=True)
    meta = json.loads((dst / "dataset.json").read_text())
    meta["channel_names"] = {"0": "MR"}
    (dst / "dataset.json").write_text(json.dumps(meta))
    return dst


@pytest.fixture(scope="module")
def nnssl_folder(planned_pool, tmp_path_factory):
    """A released-style nnssl output folder: checkpoint without the plan, adaptation_plan.json next to it."""
    cfg = json.loads(planned_pool.read_text())["configurations"]["3d_fullres"]
    patch = [p - p % 16 for p in cfg["patch_size"]]  # strides and nnssl's 16^3 mask blocks
    torch.manual_seed(0)
    kwargs = tiny_resenc_kwargs()
    net = resenc(kwargs)
    plan = adaptation_plan("ResidualEncoderUNet", serialized(kwargs), cfg["spacing"], patch)
    folder = tmp_path_factory.mktemp("nnssl") / "BaseMAETrainer_BS8__nnsslPlans__onemmiso"
    folder.mkdir()
    write_checkpoint(folder / "checkpoint_final.pth", net, plan, with_plan=False)
    (folder / "adaptation_plan.json").write_text(json.dumps(plan))
    return folder, net, patch


def test_import_nnssl_plans_selects_and_trains_a_task(nnunet, nnssl_folder, mr_task, tmp_path):
    folder, original, patch = nnssl_folder
    run(["medseqft", "import-nnssl", str(folder), "-o", str(tmp_path / "m0")], nnunet)
    out = tmp_path / "m0" / "checkpoint_final.pth"
    foundation = load_foundation(str(out))
    assert foundation.ssl == nnssl_import.NNSSL_MAE and foundation.num_input_channels == 1
    assert foundation.plans["configurations"]["3d_fullres"]["patch_size"] == patch
    x = torch.randn(1, 1, *patch)
    with torch.no_grad():  # the same network, weights carried exactly, reconstruction head included
        assert (foundation.build_ssl_network()(x) - original.eval()(x)).abs().max() < 1e-5

    before = out.read_bytes()
    again = run(["medseqft", "import-nnssl", str(folder), "-o", str(tmp_path / "m0")], nnunet, check=False)
    assert again.returncode == 2 and "never overwritten" in again.stderr and out.read_bytes() == before

    run(["medseqft", "plan", "-d", str(MR_TASK_ID), "--foundation", str(out), "--plans-name", PLANS], nnunet)
    plans = json.loads(next(nnunet.preprocessed.glob(f"Dataset{MR_TASK_ID}_*/{PLANS}.json")).read_text())
    cfg = plans["configurations"]["3d_fullres"]
    assert cfg["architecture"]["network_class_name"].endswith("ResidualEncoderUNet")
    assert cfg["normalization_schemes"] == ["ZScoreNormalization"] and cfg["patch_size"] == patch
    run(["medseqft", "select", "-d", str(MR_TASK_ID), "-f", "0", "-p", PLANS, "--repeats", "4"], nnunet)
    buffer = json.loads(next(nnunet.preprocessed.glob(f"Dataset{MR_TASK_ID}_*/mds_buffer__{PLANS}__3d_fullres__fold0"
                                                      ".json")).read_text())
    assert buffer["key"]["ssl"] == nnssl_import.NNSSL_MAE.to_dict() and buffer["buffer"]
    assert buffer["foundation"]["imported_from"]["trainer_name"] == "BaseMAETrainer_BS8"

    run(["nnUNetv2_train", str(MR_TASK_ID), "3d_fullres", "0", "-tr", "MedSeqFTTrainer_tiny", "-p", PLANS,
         "-pretrained_weights", str(out), "-device", "cpu"], nnunet)
    final = next(nnunet.results.glob(f"Dataset{MR_TASK_ID}_*/MedSeqFTTrainer_tiny__{PLANS}__3d_fullres/fold_0/"
                                     "checkpoint_final.pth"))
    assert torch.load(final, map_location="cpu", weights_only=False)["medseqft"]["stage"] == "merged"


def test_resenc_l_preset_is_nnssls_network():
    """'ResEncL' (no arch_kwargs in the plan) maps to exactly the network nnssl's get_res_enc_l builds."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_medseqft.method.ssl import build_ssl_network

    plan = adaptation_plan("ResEncL", None, [1, 1, 1], [160, 160, 160])
    plan["pretrain_plan"]["configurations"]["onemmiso"]["use_mask_for_norm"] = False  # nnssl's examples: a bare bool
    plans, dataset_json = nnssl_import.nnunet_plans(plan, "onemmiso", plan["pretrain_plan"]["configurations"]["onemmiso"],
                                                    "nnsslPlans")
    assert dataset_json["channel_names"] == {"0": "zscore"}
    assert plans["configurations"]["3d_fullres"]["use_mask_for_norm"] == [False]
    with torch.device("meta"):
        pm = PlansManager(plans)
        ours = build_ssl_network(pm, pm.get_configuration("3d_fullres"), 1).state_dict()
        theirs = resenc(NNSSL_RESENC_L).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert "decoder.seg_layers.4.weight" in ours


@pytest.mark.parametrize("trainer, expected", [
    ("BaseMAETrainer_BS8_1000ep", (0.75, 16)), ("BaseMAETrainer_BS8_ep1000_mask60", (0.6, 16)),
    ("BaseMAETrainer_BS8_ep1000_maskblock8", (0.75, 8)), ("AugMAETrainer_BS8_ep1000_aug_slow_ioff", (0.75, 16))])
def test_ssl_objective_read_from_nnssl_trainer_name(trainer, expected):
    settings, source = nnssl_import.ssl_settings(trainer)
    assert (settings.mask_ratio, settings.block_size) == expected and trainer in source


@pytest.mark.parametrize("trainer", ["SimCLRTrainer", "BaseMAETrainer_BS8_ep1000_SSIM", "BaseMAETrainerSSIM",
                                     "SliceMaskMAE", None])
def test_unknown_or_contrastive_objective_is_refused_unless_given(trainer):
    with pytest.raises(MedSeqFTError, match="--ssl mask_ratio"):
        nnssl_import.ssl_settings(trainer)
    settings, source = nnssl_import.ssl_settings(trainer, {"mask_ratio": 0.6, "block_size": 8})
    assert (settings.mask_ratio, settings.block_size, source) == (0.6, 8, "given")


def test_what_cannot_work_is_refused_before_anything_is_written(tmp_path):
    kwargs = tiny_resenc_kwargs()
    good = adaptation_plan("ResidualEncoderUNet", serialized(kwargs), [1, 1, 1], [16, 16, 16])
    cases = {
        "primus": (adaptation_plan("PrimusM", None, [1, 1, 1], [160, 160, 160]), resenc(kwargs), "transformer"),
        "patch": (adaptation_plan("ResidualEncoderUNet", serialized(kwargs), [1, 1, 1], [18, 16, 16]), resenc(kwargs),
                  "divisible"),
        "mask_block": (adaptation_plan("ResidualEncoderUNet", serialized(kwargs), [1, 1, 1], [16, 16, 16]),
                       resenc(kwargs), "multiple of the SSL block size"),
        "encoder_only": (good, resenc(kwargs).encoder, "no decoder"),
        "ct": ({**good, "pretrain_plan": {**good["pretrain_plan"], "configurations": {"onemmiso": {
            **good["pretrain_plan"]["configurations"]["onemmiso"], "normalization_schemes": ["CTNormalization"]}}}},
            resenc(kwargs), "intensity statistics"),
    }
    for name, (plan, net, message) in cases.items():
        src = tmp_path / f"{name}.pth"
        if name == "encoder_only":  # an encoder saved under the U-Net's key names
            torch.save({"network_weights": {f"encoder.{k}": v for k, v in net.state_dict().items()},
                        "nnssl_adaptation_plan": plan, "trainer_name": "BaseMAETrainer"}, src)
        else:
            write_checkpoint(src, net, plan, "BaseMAETrainer_BS8_ep1000_maskblock32" if name == "mask_block"
                             else "BaseMAETrainer_BS8")
        with pytest.raises(MedSeqFTError, match=message):
            nnssl_import.import_nnssl(str(src), str(tmp_path / f"out_{name}"))
        assert not (tmp_path / f"out_{name}").exists()
