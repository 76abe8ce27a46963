"""The planner's MDS hook: ``nnUNetv2_plan_and_preprocess -pl MedSeqFTPlanner`` ends with the MDS buffer of
every fold written next to ``splits_final.json``, where ``medseqft select`` and the trainers reuse it.

nnU-Net's entry point plans (the planner's ``plan_experiment``) and then preprocesses with the plans'
preprocessor, which stays nnU-Net's DefaultPreprocessor so that stock ``nnUNetv2_predict`` works anywhere.
The planner therefore has no call after preprocessing; it schedules the buffers for the end of the
command instead (``atexit``), and they are written only if the command preprocessed every case of the
dataset. ``MEDSEQFT_MDS_FOLDS`` chooses the folds (default ``0 1 2 3 4``; ``none`` turns the hook off);
``medseqft plan`` and ``medseqft run`` leave buffers to their own select step.
"""

from __future__ import annotations

import atexit
import os
import sys

FOLDS_ENV = "MEDSEQFT_MDS_FOLDS"
DEFAULT_FOLDS = (0, 1, 2, 3, 4)


def hook_folds() -> list[int | str]:
    from nnunetv2_medseqft.paths import parse_fold

    text = os.environ.get(FOLDS_ENV, " ".join(map(str, DEFAULT_FOLDS))).replace(",", " ").split()
    return [] if text in ([], ["none"]) else [parse_fold(f) for f in text]


def is_stock_plan_and_preprocess(argv: list[str] | None = None) -> bool:
    """Called from nnU-Net's own command, which preprocesses after planning (unless -no_pp)."""
    argv = sys.argv if argv is None else argv
    return os.path.basename(argv[0]).startswith("nnUNetv2_plan_and_preprocess") and "--no_pp" not in argv


def preprocessing_complete(dataset_name: str, plans: dict, configuration: str) -> bool:
    from nnunetv2_medseqft.paths import preprocessed_root, raw_dataset_json

    cfg = plans["configurations"].get(configuration, {})
    data = os.path.join(preprocessed_root(), dataset_name, cfg.get("data_identifier", "?"))
    n = raw_dataset_json(dataset_name)["numTraining"]
    return os.path.isdir(data) and sum(f.endswith(".pkl") for f in os.listdir(data)) == n


def write_buffers(dataset_name: str, plans: dict, configuration: str, folds) -> list[str]:
    """``medseqft select`` for each fold, each in a fresh process (this one is shutting down: no new threads or
    exit hooks), reusing a buffer made with the same inputs; returns the buffer files."""
    import subprocess

    import torch

    from nnunetv2_medseqft.method.buffer import buffer_file_path

    device = "cuda" if torch.cuda.is_available() else "cpu"
    files = []
    for fold in folds:
        cmd = [sys.executable, "-m", "nnunetv2_medseqft.cli.main", "select", "-d", dataset_name, "-f", str(fold),
               "-p", plans["plans_name"], "-c", configuration, "--device", device]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError((proc.stderr or proc.stdout).strip().splitlines()[-1] if (proc.stderr or proc.stdout)
                               else f"medseqft select exited with {proc.returncode}")
        files.append(buffer_file_path(dataset_name, fold, plans["plans_name"], configuration))
    return files


def schedule_buffers(dataset_name: str, plans: dict, configuration: str = "3d_fullres") -> None:
    """At the end of ``nnUNetv2_plan_and_preprocess``: the buffers of ``hook_folds()``, if preprocessing finished."""
    folds = hook_folds()
    if not folds or configuration not in plans.get("configurations", {}):
        return

    later = f"medseqft select -d {dataset_name} -f FOLD -p {plans['plans_name']}"

    def run() -> None:
        if not preprocessing_complete(dataset_name, plans, configuration):
            print(f"MedSeqFTPlanner: {dataset_name} is not fully preprocessed; no MDS buffers written (run {later} "
                  "once it is).")
            return
        print(f"MedSeqFTPlanner: MDS buffers of {dataset_name}, folds {' '.join(map(str, folds))} "
              f"(set {FOLDS_ENV}=none to skip)...")
        try:
            for path in write_buffers(dataset_name, plans, configuration, folds):
                print(f"  {path}")
        except Exception as e:  # the plans and data are written and fine; only the buffers are missing
            print(f"MedSeqFTPlanner: no MDS buffers for {dataset_name}: {type(e).__name__}: {e}\n"
                  f"The trainers score them when they start, or run {later}.", file=sys.stderr)

    atexit.register(run)
