"""The CPU scale: MedSeqFTCPUPlanner through stock nnU-Net, inherited downstream, trained and predicted with stock
commands; a foundation of one scale is refused for data planned at another, and nothing is overwritten."""

import json

import pytest
from conftest import FIRST_TASK_ID, POOL_ID
from nnunet_helpers import folder_hashes, run
from nnunetv2_medseqft.planners.cpu_planner import BASE_FEATURES, CPU_PLANS_NAME, MAX_FEATURES, MAX_PATCH_EDGE

PRETRAINER = "MedSeqFTPretrainTrainer_tiny"
TASK_PLANS = "MedSeqFTPlans_cpu"


def _config(plans_file) -> dict:
    return json.loads(plans_file.read_text())["configurations"]["3d_fullres"]


@pytest.fixture(scope="module")
def cpu_foundation(nnunet, planned_pool):
    """The tiny pool planned with stock nnUNetv2_plan_and_preprocess -pl MedSeqFTCPUPlanner, then pre-trained."""
    run(["medseqft", "register"], nnunet)  # -pl needs the planner shim in nnunetv2's folder
    run(["nnUNetv2_plan_and_preprocess", "-d", str(POOL_ID), "-pl", "MedSeqFTCPUPlanner", "-c", "3d_fullres",
         "-np", "2"], nnunet)
    run(["nnUNetv2_train", str(POOL_ID), "3d_fullres", "all", "-tr", PRETRAINER, "-p", CPU_PLANS_NAME,
         "-device", "cpu"], nnunet)
    return next(nnunet.results.glob(f"Dataset{POOL_ID}_*/{PRETRAINER}__{CPU_PLANS_NAME}__3d_fullres/fold_all/"
                                    "checkpoint_final.pth"))


def test_cpu_planner_gives_the_small_network_and_downstream_inherits_it(nnunet, cpu_foundation):
    pool = next(nnunet.preprocessed.glob(f"Dataset{POOL_ID}_*"))
    cpu, default = _config(pool / f"{CPU_PLANS_NAME}.json"), _config(pool / "nnUNetPlans.json")
    features = cpu["architecture"]["arch_kwargs"]["features_per_stage"]
    assert features[0] == BASE_FEATURES and max(features) == MAX_FEATURES
    assert max(default["architecture"]["arch_kwargs"]["features_per_stage"]) > MAX_FEATURES
    assert max(cpu["patch_size"]) <= MAX_PATCH_EDGE and cpu["batch_size"] == 2
    assert cpu["spacing"] == default["spacing"]  # nnU-Net's own data-driven choices are kept
    assert (pool / f"{CPU_PLANS_NAME}_3d_fullres").is_dir()

    run(["medseqft", "plan", "-d", str(FIRST_TASK_ID), "--foundation", str(cpu_foundation), "--plans-name", TASK_PLANS],
        nnunet)
    task = next(nnunet.preprocessed.glob(f"Dataset{FIRST_TASK_ID}_*"))
    ours = _config(task / f"{TASK_PLANS}.json")
    assert ours["architecture"] == cpu["architecture"] and ours["patch_size"] == cpu["patch_size"]


def test_fft_at_cpu_scale_predicts_with_stock_nnunet(nnunet, cpu_foundation, tmp_path):
    # after the planning test (same module, file order): the task has the inherited plans
    run(["nnUNetv2_train", str(FIRST_TASK_ID), "3d_fullres", "0", "-tr", "MedSeqFTFFTTrainer_tiny", "-p", TASK_PLANS,
         "-pretrained_weights", str(cpu_foundation), "-device", "cpu"], nnunet)
    images = sorted(next(nnunet.raw.glob(f"Dataset{FIRST_TASK_ID}_*")).glob("imagesTr/*_0000.nii.gz"))[:1]
    src = tmp_path / "in"
    src.mkdir()
    (src / images[0].name).symlink_to(images[0])
    run(["nnUNetv2_predict", "-i", str(src), "-o", str(tmp_path / "out"), "-d", str(FIRST_TASK_ID), "-c", "3d_fullres",
         "-f", "0", "-tr", "MedSeqFTFFTTrainer_tiny", "-p", TASK_PLANS, "-device", "cpu", "--disable_tta"], nnunet)
    assert (tmp_path / "out" / images[0].name.replace("_0000", "")).is_file()


def test_foundation_of_another_scale_is_refused_and_nothing_is_touched(nnunet, planned_task, cpu_foundation):
    """Task 501 is planned as MedSeqFTPlans with the tiny-scale foundation (conftest): the CPU-scale one must not
    re-plan it nor start a training on it."""
    before = folder_hashes(planned_task.preprocessed)
    proc = run(["medseqft", "plan", "-d", str(FIRST_TASK_ID), "--foundation", str(cpu_foundation)], nnunet, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "already planned as 'MedSeqFTPlans' with another network" in proc.stderr
    assert f"{CPU_PLANS_NAME}: PlainConvUNet, features {BASE_FEATURES}-{MAX_FEATURES}" in proc.stderr
    assert "existing: MedSeqFTPlans: PlainConvUNet, features 32-" in proc.stderr
    assert "--plans-name MedSeqFTPlans_2" in proc.stderr

    proc = run(["nnUNetv2_train", str(FIRST_TASK_ID), "3d_fullres", "0", "-tr", "MedSeqFTFFTTrainer_tiny", "-p",
                "MedSeqFTPlans", "-pretrained_weights", str(cpu_foundation), "-device", "cpu"], nnunet, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "has another architecture than these plans" in out
    assert f"the model: {CPU_PLANS_NAME}: PlainConvUNet" in out and "these plans: MedSeqFTPlans: PlainConvUNet" in out
    assert folder_hashes(planned_task.preprocessed) == before
    assert not list(nnunet.results.glob(f"Dataset{FIRST_TASK_ID}_*/MedSeqFTFFTTrainer_tiny__MedSeqFTPlans__3d_fullres/"
                                        "fold_0/*.pth"))
