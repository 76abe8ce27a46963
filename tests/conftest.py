"""Session fixtures: one generated benchmark, one planned pool and one tiny foundation, shared by all tests.

Planning and pre-training are real nnU-Net runs (minutes on 2 CPU cores), so they happen once.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from nnunet_helpers import NnunetFolders, run  # noqa: E402

POOL_ID = 500
FIRST_TASK_ID = 501
PRETRAIN_TRAINER = "MedSeqFTPretrainTrainer_tiny"


@pytest.fixture(scope="session")
def nnunet(tmp_path_factory) -> NnunetFolders:
    """nnU-Net folders holding the tiny generated benchmark in raw format."""
    from nnunetv2_medseqft.synth import generate

    folders = NnunetFolders(tmp_path_factory.mktemp("nnunet"))
    generate(folders.raw, preset="tiny", seed=0, first_id=POOL_ID)
    return folders


@pytest.fixture(scope="session")
def planned_pool(nnunet) -> Path:
    """The pool planned and preprocessed (3d_fullres) with stock nnU-Net; returns its plans file."""
    run(["nnUNetv2_plan_and_preprocess", "-d", str(POOL_ID), "-c", "3d_fullres", "-np", "2"], nnunet)
    plans = next((nnunet.preprocessed).glob(f"Dataset{POOL_ID}_*/nnUNetPlans.json"))
    return plans


@pytest.fixture(scope="session")
def tiny_foundation(nnunet, planned_pool) -> Path:
    """A tiny SSL foundation pre-trained with stock nnUNetv2_train; returns checkpoint_final.pth."""
    run(["nnUNetv2_train", str(POOL_ID), "3d_fullres", "all", "-tr", PRETRAIN_TRAINER, "-device", "cpu"], nnunet)
    return next(nnunet.results.glob(f"Dataset{POOL_ID}_*/{PRETRAIN_TRAINER}__nnUNetPlans__3d_fullres/fold_all"
                                     "/checkpoint_final.pth"))


@dataclass
class PlannedTask:
    folders: NnunetFolders
    dataset_id: int
    dataset_name: str
    plans_name: str

    @property
    def preprocessed(self) -> Path:
        return self.folders.preprocessed / self.dataset_name


@pytest.fixture(scope="session")
def planned_task(nnunet, tiny_foundation) -> PlannedTask:
    """The first sequential task planned and preprocessed with the foundation's plans by ``medseqft plan``."""
    run(["medseqft", "plan", "-d", str(FIRST_TASK_ID), "--foundation", str(tiny_foundation)], nnunet)
    name = next(nnunet.raw.glob(f"Dataset{FIRST_TASK_ID}_*")).name
    return PlannedTask(nnunet, FIRST_TASK_ID, name, "MedSeqFTPlans")
