"""Where a ``medseqft run`` keeps its records: ``$nnUNet_results/medseqft_runs/<NAME>/``.

The task models themselves stay in nnU-Net's results layout (``$nnUNet_results/DatasetXXX/
TRAINER__PLANS__CONFIG/fold_F``) so that stock ``nnUNetv2_predict`` works on each of them; the run
folder holds the manifest (every step: inputs, outputs, hashes, timings, status), the scores
(``results.json``), the per-step logs and the report.
"""

from __future__ import annotations

import os
import re

from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.paths import results_root

RUNS_FOLDER = "medseqft_runs"
MANIFEST_FILE = "manifest.json"
RESULTS_FILE = "results.json"
LOCK_FILE = ".lock"
LOGS_FOLDER = "logs"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*(_[A-Za-z0-9-]+)*$")  # no '__': nnU-Net's folder separator


def runs_root() -> str:
    return os.path.join(results_root(), RUNS_FOLDER)


def check_run_name(name: str) -> str:
    if not NAME_PATTERN.match(name or ""):
        raise MedSeqFTError(f"Bad run name {name!r}: use letters, digits, '-' and single '_' "
                            "(no '__', which nnU-Net uses to separate trainer, plans and configuration).")
    return name


def run_folder(name: str) -> str:
    return os.path.join(runs_root(), check_run_name(name))


def resolve_run(name_or_path: str) -> str:
    """A run given by name (under ``$nnUNet_results/medseqft_runs``) or by the path of its folder."""
    if os.path.isfile(os.path.join(name_or_path, MANIFEST_FILE)) or \
            os.path.isfile(os.path.join(name_or_path, RESULTS_FILE)):
        return os.path.abspath(name_or_path)
    if NAME_PATTERN.match(name_or_path) and os.environ.get("nnUNet_results"):
        folder = run_folder(name_or_path)
        if os.path.isdir(folder):
            return folder
    known = sorted(os.listdir(runs_root())) if os.environ.get("nnUNet_results") and os.path.isdir(runs_root()) else []
    raise MedSeqFTError(f"No medseqft run {name_or_path!r}: give a run name under $nnUNet_results/{RUNS_FOLDER} "
                        f"(known: {', '.join(known) or 'none'}) or the path of a run folder.")
