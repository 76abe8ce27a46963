"""Scales of the generated benchmark: which data, which plans, which foundation budget and which task budget.

One name selects the whole chain, as nnU-Net users select a preset with ``-pl``: the pool is planned
with the scale's planner, the foundation is pre-trained on those plans, and every downstream task
inherits them through ``medseqft plan``. Used by ``medseqft demo`` and the benchmarks.

- ``tiny``: unit tests. nnU-Net's default planner on 32^3 images; the models do not learn in its budget.
- ``cpu``: the benchmark scale on 2 CPU cores (``MedSeqFTCPUPlanner``: 8-64 features, 32^3 patch,
  batch 2, on ~71x71x51 images: the small organs span enough voxels to be learned).
- ``cpu-resenc``: the ``cpu`` scale on nnU-Net's residual-encoder preset (``MedSeqFTResEncCPUPlanner``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from nnunetv2_medseqft.errors import MedSeqFTError


@dataclass(frozen=True)
class Scale:
    name: str
    preset: str  # medseqft synth --preset
    planner: str | None  # nnUNetv2_plan_and_preprocess -pl (None: nnU-Net's default)
    plans_name: str  # what that planner writes
    pretrain_trainer: str  # foundation budget
    epochs: int  # task budget: epochs x iterations per task (medseqft run --epochs/--iterations)
    iterations: int
    val_iterations: int
    mirroring: bool = True  # False: the generated abdomen has sides (liver right, spleen left), so no mirroring
    # what a task started from M0 receives (medseqft run --m0-transfer): "encoder" where the MIM decoder's last
    # stage is left dead for segmentation (README: Scales)
    m0_transfer: str = "full"

    def plan_command(self, dataset_id: int, processes: str = "2") -> list[str]:
        """The stock command (``-pl`` needs ``medseqft register``: nnU-Net finds planners only in its own folder)."""
        cmd = ["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", "3d_fullres", "-np", processes]
        return cmd + (["-pl", self.planner] if self.planner else [])

    def plan_pool_command(self, dataset_id: int, processes: str = "2") -> list[str]:
        """The same planning through nnU-Net's API with our planner class, so nothing needs registering."""
        return [sys.executable, "-c", f"from nnunetv2_medseqft.scales import plan_pool; "
                f"plan_pool({self.name!r}, {int(dataset_id)}, {int(processes)})"]

    def foundation_folder(self) -> str:
        """Model folder of the foundation inside the pool's results folder."""
        return f"{self.pretrain_trainer}__{self.plans_name}__3d_fullres"

    def budget_args(self, epochs: int | None = None) -> list[str]:
        return ["--epochs", str(epochs or self.epochs), "--iterations", str(self.iterations),
                "--val-iterations", str(self.val_iterations)] + self.recipe_args()

    def recipe_args(self) -> list[str]:
        """``medseqft run`` options of the scale besides the budget."""
        return ([] if self.mirroring else ["--no-mirroring"]) + \
            ([] if self.m0_transfer == "full" else ["--m0-transfer", self.m0_transfer])


SCALES = {
    "tiny": Scale("tiny", "tiny", None, "nnUNetPlans", "MedSeqFTPretrainTrainer_tiny", 4, 3, 1),
    # task budget: every organ task of parallel FFT better at 24 than at 16 epochs on fold 0, the pancreas learned
    # only from there (benchmarks/results/scale-tasks-2026-12-03.txt)
    "cpu": Scale("cpu", "cpu", "MedSeqFTCPUPlanner", "MedSeqFTCPUPlans", "MedSeqFTPretrainTrainer_cpu", 24, 50, 5,
                 mirroring=False, m0_transfer="encoder"),
    # the same data and widths on nnU-Net's residual-encoder preset (ResEnc M layout), for the ResEnc benchmarks
    "cpu-resenc": Scale("cpu-resenc", "cpu", "MedSeqFTResEncCPUPlanner", "MedSeqFTResEncCPUPlans",
                        "MedSeqFTPretrainTrainer_cpu", 24, 50, 5, mirroring=False, m0_transfer="encoder"),
}


def plan_pool(scale: str, dataset_id: int, processes: int = 2) -> None:
    """What ``nnUNetv2_plan_and_preprocess -d ID -c 3d_fullres -pl PLANNER`` does, with the class itself."""
    import importlib

    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, preprocess

    from nnunetv2_medseqft.plugin.registry import PLANNERS

    s = get_scale(scale)
    extract_fingerprints([dataset_id], num_processes=processes, check_dataset_integrity=False, clean=False,
                         verbose=False)
    if s.planner:
        planner = getattr(importlib.import_module(PLANNERS[s.planner]), s.planner)(dataset_id)
    else:
        from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import (
            ExperimentPlanner,
        )

        planner = ExperimentPlanner(dataset_id)
    planner.plan_experiment()
    preprocess([dataset_id], planner.plans_identifier, configurations=("3d_fullres",), num_processes=(processes,),
               verbose=False)


def get_scale(name: str) -> Scale:
    if name not in SCALES:
        raise MedSeqFTError(f"unknown scale {name!r}: use one of {', '.join(SCALES)}")
    return SCALES[name]
