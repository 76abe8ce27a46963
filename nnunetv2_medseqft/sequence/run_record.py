"""Reading a run someone else made (``chain``, ``analyze``, ``evaluate``): its manifest and the task models it
recorded. The one reader of a finished run; ``manifest.py`` is the writer."""

from __future__ import annotations

import os

from nnunetv2_medseqft.checkpoints import verify_sha256
from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.jsonio import read_json
from nnunetv2_medseqft.paths import resolved
from nnunetv2_medseqft.sequence.layout import MANIFEST_FILE, resolve_run, runs_root
from nnunetv2_medseqft.sequence.manifest import check_manifest_format


def read_run(name_or_path: str) -> tuple[str, dict]:
    """(run folder, manifest) of a run given by name or folder."""
    folder = resolve_run(name_or_path)
    path = os.path.join(folder, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise MedSeqFTError(f"{folder} has no {MANIFEST_FILE}: this needs a run made by medseqft run.")
    try:
        data = read_json(path)
    except ValueError as e:
        raise MedSeqFTError(f"{path} is not valid JSON ({e}). Restore it from a backup.") from e
    check_manifest_format(data, path)
    return folder, data


def run_foundation(manifest: dict, override: str | None = None) -> str:
    """The foundation the run started from (``override`` if it moved), checked by its sha256."""
    path = override or resolved((manifest.get("foundation") or {}).get("path"))
    verify_sha256(path, manifest["settings"]["foundation_sha256"], f"The foundation of run '{manifest.get('name')}'",
                  "Pass the run's own foundation with --foundation.")
    return path


def find_task(manifest: dict, task: str) -> str:
    """The dataset name of a task of the run, given by id or name."""
    datasets = manifest["settings"]["datasets"]
    text = str(task)
    hits = [d for d in datasets if d == text or (text.isdigit() and d.startswith(f"Dataset{int(text):03d}_"))]
    if len(hits) != 1:
        raise MedSeqFTError(f"Task {task} is not a task of run '{manifest.get('name')}' "
                            f"(tasks: {', '.join(datasets)}).")
    return hits[0]


def task_checkpoint(manifest: dict, dataset: str, which: str = "M") -> str:
    """checkpoint_final.pth (M_t) or checkpoint_fft.pth (F_t) of a trained task."""
    step = manifest["steps"].get(f"train/{dataset}") or {}
    if step.get("status") != "done":
        raise MedSeqFTError(f"Task {dataset} of run '{manifest.get('name')}' is not trained yet "
                            f"(train/{dataset}: {step.get('status', 'not started')}).")
    key = "fft" if which == "F" else "model"
    record = (step.get("outputs") or {}).get(key)
    if not record:
        raise MedSeqFTError(f"Run '{manifest.get('name')}' ({manifest['settings']['method']}) has no F_t for "
                            f"{dataset}: only methods with a full fine-tuning stage keep F_t. Use --models M.")
    return resolved(record["path"])


def task_models(manifest: dict) -> list[tuple[str, str]]:
    """(dataset, checkpoint_final path) of each trained task model, in task order; the run must be finished."""
    settings, steps = manifest["settings"], manifest.get("steps", {})
    if settings.get("method") == "multitask":
        union = ((steps.get("union") or {}).get("outputs") or {}).get("dataset")
        keys = [(union, "train/union")]
    else:
        keys = [(d, f"train/{d}") for d in settings["datasets"]]
    tasks = []
    for dataset, key in keys:
        step = steps.get(key) or {}
        if step.get("status") != "done":
            raise MedSeqFTError(f"Run '{manifest.get('name')}' is not finished: step {key} is "
                                f"{step.get('status', 'not started')}. Finish it (re-run its medseqft run command) "
                                "first.")
        tasks.append((dataset, resolved(step["outputs"]["model"]["path"])))
    return tasks


def runs_recording(path: str) -> list[str]:
    """Names of the runs whose manifest records ``path`` as a step output."""
    target, names = os.path.abspath(path), []  # records hold portable or (older runs) absolute paths
    root = runs_root()
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        try:
            steps = read_json(os.path.join(root, name, MANIFEST_FILE)).get("steps") or {}
        except (OSError, ValueError):
            continue
        if any(isinstance(rec, dict) and rec.get("path") and os.path.abspath(resolved(rec["path"])) == target
               for step in steps.values() for rec in (step.get("outputs") or {}).values()):
            names.append(name)
    return names


def refuse_if_recorded(path: str, what: str, fix: str) -> None:
    """A file a run's manifest records is that run's: another command never overwrites it."""
    runs = runs_recording(path)
    if runs:
        raise MedSeqFTError(f"{path} is the {what} of run(s) {', '.join(runs)} (recorded in their manifest); "
                            f"overwriting it would leave them unable to resume or report. Nothing was written. {fix}")
