"""Scales of the generated benchmark: which data, which plans, which foundation budget and which task budget.

One name selects the whole chain, as nnU-Net users select a preset with ``-pl``: the pool is planned
with the scale's planner, the foundation is pre-trained on those plans, and every downstream task
inherits them through ``medseqft plan``. Used by ``medseqft demo`` and the benchmarks.

- ``tiny``: unit tests. nnU-Net's default planner on 32^3 images; the models do not learn in its budget.
- ``cpu``: the benchmark scale on 2 CPU cores (``MedSeqFTCPUPlanner``: 8-64 features, 32^3 patch,
  batch 2): a liver model learns (Dice > 80) in about 3 minutes, the foundation in about 13.
"""

from __future__ import annotations

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

    def plan_command(self, dataset_id: int, processes: str = "2") -> list[str]:
        cmd = ["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", "3d_fullres", "-np", processes]
        return cmd + (["-pl", self.planner] if self.planner else [])

    def foundation_folder(self) -> str:
        """Model folder of the foundation inside the pool's results folder."""
        return f"{self.pretrain_trainer}__{self.plans_name}__3d_fullres"

    def budget_args(self) -> list[str]:
        return ["--epochs", str(self.epochs), "--iterations", str(self.iterations),
                "--val-iterations", str(self.val_iterations)]


SCALES = {
    "tiny": Scale("tiny", "tiny", None, "nnUNetPlans", "MedSeqFTPretrainTrainer_tiny", 4, 3, 1),
    # task budget: the plateau of parallel FFT (benchmarks/results/scale-*.txt)
    "cpu": Scale("cpu", "cpu", "MedSeqFTCPUPlanner", "MedSeqFTCPUPlans", "MedSeqFTPretrainTrainer_cpu", 16, 50, 5),
}


def get_scale(name: str) -> Scale:
    if name not in SCALES:
        raise MedSeqFTError(f"unknown scale {name!r}: use one of {', '.join(SCALES)}")
    return SCALES[name]
