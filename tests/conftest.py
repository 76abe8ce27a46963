"""Session fixtures: one generated benchmark, one planned pool and one tiny foundation, shared by all tests.

Planning and pre-training are real nnU-Net runs (minutes on 2 CPU cores), so they happen once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from nnunet_helpers import BIN, PACKABLE, NnunetFolders, folder_hashes, manifest, run, run_cmd  # noqa: E402

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
    # The trainers' MDS at test scale: 8 fixed draws per case. The adaptive default (up to 1000 draws) meets near-ties
    # on these tiny cases and took ~2 min of every trainer test; test_mds.py covers adaptive scoring.
    plans_file = nnunet.preprocessed / name / "MedSeqFTPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["medseqft"]["mds"] = {**plans["medseqft"].get("mds", {}), "repeats": 8}
    plans_file.write_text(json.dumps(plans, indent=2))
    return PlannedTask(nnunet, FIRST_TASK_ID, name, "MedSeqFTPlans")


@pytest.fixture(scope="session")
def medseqft_run(nnunet, tiny_foundation):
    """A 2-task MedSeqFT run killed (SIGKILL, whole process group) after task 1, then resumed."""
    name = "t-medseqft"
    env = nnunet.env()
    cmd = run_cmd(tiny_foundation, name, "medseqft", *PACKABLE)
    proc = subprocess.Popen([str(BIN / cmd[0])] + cmd[1:], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    first = "Dataset501_MSFTLiver"
    deadline = time.time() + 1200
    while time.time() < deadline and proc.poll() is None:
        if manifest(nnunet, name).get("steps", {}).get(f"evaluate/{first}", {}).get("status") == "done":
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    steps = manifest(nnunet, name)["steps"]
    model_folder = Path(steps[f"train/{first}"]["outputs"]["model"]["path"]).parent
    before = folder_hashes(model_folder)
    resumed = run(cmd, nnunet)
    return name, model_folder, before, resumed
