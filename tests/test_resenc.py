"""ResEnc end to end: nnU-Net's residual-encoder preset (at CPU widths, ``MedSeqFTResEncCPUPlanner``) through stock
planning, pre-training, ``medseqft plan``, a MedSeqFT task step with LoRA on its stem and 1x1x1 skip convs, the merge
and stock ``nnUNetv2_predict``."""

import json

import pytest
import torch
from conftest import FIRST_TASK_ID, POOL_ID
from nnunet_helpers import run
from safetensors.torch import load_file

from nnunetv2_medseqft import adapters
from nnunetv2_medseqft.planners.cpu_planner import RESENC_CPU_PLANS_NAME

PRETRAINER = "MedSeqFTPretrainTrainer_tiny"
TRAINER = "MedSeqFTTrainer_tiny"
TASK_PLANS = "MedSeqFTPlans_resenc"
RESENC = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def resenc_foundation(nnunet, planned_pool):
    run(["medseqft", "register"], nnunet)
    run(["nnUNetv2_plan_and_preprocess", "-d", str(POOL_ID), "-pl", "MedSeqFTResEncCPUPlanner", "-c", "3d_fullres",
         "-np", "2"], nnunet)
    run(["nnUNetv2_train", str(POOL_ID), "3d_fullres", "all", "-tr", PRETRAINER, "-p", RESENC_CPU_PLANS_NAME,
         "-device", "cpu"], nnunet)
    return next(nnunet.results.glob(f"Dataset{POOL_ID}_*/{PRETRAINER}__{RESENC_CPU_PLANS_NAME}__3d_fullres/fold_all/"
                                    "checkpoint_final.pth"))


def _network(plans: dict, outputs: int):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    return nnUNetTrainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 1, outputs, True)


def test_lora_on_resenc_covers_stem_and_skips_and_merges_exactly(resenc_foundation):
    plans = _load(resenc_foundation)["init_args"]["plans"]
    assert plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] == RESENC
    torch.manual_seed(0)
    net = _network(plans, 2).eval()
    student = adapters.add_lora(net, 4, 8.0, r".*(stages|stem).*\.conv").eval()
    names = [n for n, m in student.named_modules() if isinstance(m, adapters.MergedWeightConv3d)]
    assert any(".stem." in n for n in names) and any(".skip." in n for n in names), names
    for name, p in student.named_parameters():
        if "lora_B" in name:  # B = 0 at the start: give the update a size, so the check can fail
            torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(1, 1, *plans["configurations"]["3d_fullres"]["patch_size"])
    with torch.no_grad():
        unmerged = student(x)[0]
        plain = _network(plans, 2).eval()
        plain.load_state_dict(adapters.merged_state_dict(student))
        from_state = plain(x)[0]
        merged = adapters.merge(student)(x)[0]
    assert (unmerged - from_state).abs().max() < 1e-4 and (unmerged - merged).abs().max() < 1e-4
    assert (unmerged - _network(plans, 2).eval()(x)[0]).abs().max() > 1e-3  # the adapter does change the output


def test_resenc_task_step_merges_and_predicts_with_stock_nnunet(nnunet, resenc_foundation, tmp_path):
    run(["medseqft", "plan", "-d", str(FIRST_TASK_ID), "--foundation", str(resenc_foundation), "--plans-name",
         TASK_PLANS], nnunet)
    task = next(nnunet.preprocessed.glob(f"Dataset{FIRST_TASK_ID}_*"))
    arch = json.loads((task / f"{TASK_PLANS}.json").read_text())["configurations"]["3d_fullres"]["architecture"]
    assert arch["network_class_name"] == RESENC
    run(["nnUNetv2_train", str(FIRST_TASK_ID), "3d_fullres", "0", "-tr", TRAINER, "-p", TASK_PLANS,
         "-pretrained_weights", str(resenc_foundation), "-device", "cpu"], nnunet)
    out = next(nnunet.results.glob(f"Dataset{FIRST_TASK_ID}_*/{TRAINER}__{TASK_PLANS}__3d_fullres/fold_0"))
    final = _load(out / "checkpoint_final.pth")
    assert final["medseqft"]["stage"] == "merged" and not any("lora" in k for k in final["network_weights"])
    keys = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(".stem." in k for k in keys) and any(".skip." in k for k in keys)
    # M_t rebuilt from the student's base (F_t, the default student_init=fft) + the saved adapter files (peft's
    # loading path) equals the merged checkpoint
    base = _network(final["init_args"]["plans"], 2)
    base.load_state_dict(_load(out / "checkpoint_fft.pth")["network_weights"])
    base.load_state_dict({k: v for k, v in final["network_weights"].items() if ".seg_layers." in k}, strict=False)
    rebuilt = adapters.merged_from_files(base, json.loads((out / "adapter" / "adapter_config.json").read_text()),
                                         keys, load_file(str(out / "adapter" / "norms_and_head.safetensors")))
    assert max((rebuilt[k] - v).abs().max().item() for k, v in final["network_weights"].items()) < 1e-5

    images = sorted(next(nnunet.raw.glob(f"Dataset{FIRST_TASK_ID}_*")).glob("imagesTr/*_0000.nii.gz"))[:1]
    src = tmp_path / "in"
    src.mkdir()
    (src / images[0].name).symlink_to(images[0])
    run(["nnUNetv2_predict", "-i", str(src), "-o", str(tmp_path / "pred"), "-d", str(FIRST_TASK_ID), "-c",
         "3d_fullres", "-f", "0", "-tr", TRAINER, "-p", TASK_PLANS, "-device", "cpu", "--disable_tta"], nnunet)
    assert (tmp_path / "pred" / images[0].name.replace("_0000", "")).is_file()
