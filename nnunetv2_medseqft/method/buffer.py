"""The MDS buffer B_t of a fold: its inputs (checked against the plans and the foundation) and its file.

The result is one JSON file next to ``splits_final.json`` (never inside the data folder, where an extra
file breaks nnU-Net's loader): ``mds_buffer__<plans>__<configuration>__fold<F>.json``. Its ``key``
(plans, configuration, fold, foundation sha256, SSL and MDS settings, patch size, training cases)
decides reuse: same key -> the stored record is returned; any difference -> recomputed and overwritten
(``medseqft select`` refuses instead when a run's manifest records the file).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from nnunetv2_medseqft.checkpoints import verify_sha256
from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.jsonio import write_json_atomic
from nnunetv2_medseqft.method.foundation import Foundation, architecture_mismatches, load_foundation
from nnunetv2_medseqft.method.mds import FORMAT, score, summary_table
from nnunetv2_medseqft.method.settings import MDSSettings
from nnunetv2_medseqft.paths import case_sites, dataset_name, parse_fold, preprocessed_root, training_cases


def buffer_file_path(dataset_name_or_id, fold, plans_name: str = "MedSeqFTPlans",
                     configuration: str = "3d_fullres") -> str:
    """Next to splits_final.json: ``$nnUNet_preprocessed/<dataset>/mds_buffer__<plans>__<cfg>__fold<F>.json``."""
    name = dataset_name(dataset_name_or_id)
    return os.path.join(preprocessed_root(), name,
                        f"mds_buffer__{plans_name}__{configuration}__fold{parse_fold(fold)}.json")


@dataclass
class MDSInputs:
    """Everything a buffer depends on, checked. ``key`` decides whether a stored buffer is still valid."""

    dataset_name: str
    dataset_folder: str
    data_folder: str
    plans: dict
    plans_name: str
    configuration: str
    fold: int | str
    foundation: Foundation
    settings: MDSSettings
    cases: list[str]
    k: int
    key: dict = field(default_factory=dict)


def _replan_hint(name: str, foundation_path: str | None) -> str:
    return f"medseqft plan -d {name} --foundation {foundation_path or 'PATH/TO/foundation/checkpoint_final.pth'}"


def prepare(dataset_name_or_id, fold, plans_name: str = "MedSeqFTPlans", configuration: str = "3d_fullres",
            foundation_path: str | None = None, settings: MDSSettings | None = None,
            log: Callable = print) -> MDSInputs:
    """Check that the dataset was planned + preprocessed for this foundation; resolve the fold's cases and K."""
    name = dataset_name(dataset_name_or_id)
    fold = parse_fold(fold)
    dataset_folder = os.path.join(preprocessed_root(), name)
    plans_file = os.path.join(dataset_folder, f"{plans_name}.json")
    if not os.path.isfile(plans_file):
        raise MedSeqFTError(f"No plans {plans_file}: {name} is not planned for a foundation. "
                            f"Run: {_replan_hint(name, foundation_path)}")
    with open(plans_file) as f:
        plans = json.load(f)
    section = plans.get("medseqft") or {}
    recorded = section.get("foundation") or {}
    if not recorded.get("sha256"):
        raise MedSeqFTError(f"{plans_file} has no medseqft foundation section: these plans were not made by "
                            f"medseqft plan. Run: {_replan_hint(name, foundation_path)}")
    foundation_path = foundation_path or recorded.get("path")
    if not foundation_path or not os.path.isfile(foundation_path):
        raise MedSeqFTError(f"Foundation checkpoint {foundation_path} (recorded in {plans_file}) not found. "
                            "Pass --foundation PATH if it moved.")
    foundation = load_foundation(foundation_path)
    verify_sha256(foundation.path, recorded["sha256"], f"The foundation {plans_file} was planned for",
                  f"This is another foundation. Re-plan with {_replan_hint(name, foundation.path)}, or pass the "
                  "foundation it was planned with.", found=foundation.sha256)
    if configuration not in plans.get("configurations", {}):
        raise MedSeqFTError(f"{plans_file} has no configuration '{configuration}' "
                            f"(available: {sorted(plans.get('configurations', {}))}). Use -c 3d_fullres.")
    mismatches = architecture_mismatches(plans, configuration, foundation.plans, foundation.configuration)
    if mismatches:
        raise MedSeqFTError(f"{plans_file} ({configuration}) differs from the foundation's plans in {mismatches}: "
                            f"its weights would not transfer. Re-plan with {_replan_hint(name, foundation.path)}")
    cfg = _configuration(plans, configuration)
    data_folder = os.path.join(dataset_folder, cfg["data_identifier"])
    if not os.path.isdir(data_folder) or not os.listdir(data_folder):
        raise MedSeqFTError(f"Preprocessed data folder {data_folder} is missing or empty. "
                            f"Run: {_replan_hint(name, foundation.path)} (it preprocesses too).")
    if settings is None:
        settings = MDSSettings.from_dict(section.get("mds") or {})
    cases = training_cases(dataset_folder, data_folder, fold, log)
    k = settings.buffer_size(len(cases))
    key = {
        "dataset": name, "plans": plans_name, "configuration": configuration, "fold": fold,
        "foundation_sha256": foundation.sha256, "ssl": foundation.ssl.to_dict(), "settings": settings.to_dict(),
        "patch_size": [int(p) for p in cfg["patch_size"]], "data_identifier": cfg["data_identifier"],
        "training_cases": cases,
    }
    return MDSInputs(name, dataset_folder, data_folder, plans, plans_name, configuration, fold, foundation,
                     settings, cases, k, json.loads(json.dumps(key)))


def _configuration(plans: dict, configuration: str) -> dict:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    return PlansManager(copy.deepcopy(plans)).get_configuration(configuration).configuration


# ---------------------------------------------------------------- buffer file

def _read_record(path: str) -> dict | None:
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("format") == FORMAT else None


def _key_differences(stored: dict, expected: dict) -> list[str]:
    stored = stored or {}
    return sorted(f for f in set(stored) | set(expected) if stored.get(f) != expected.get(f))


def load_buffer(dataset_name_or_id, fold, plans_name: str = "MedSeqFTPlans", configuration: str = "3d_fullres",
                foundation_path: str | None = None, settings: MDSSettings | None = None) -> dict:
    """The stored buffer record; MedSeqFTError if it is missing or was made with other inputs."""
    inputs = prepare(dataset_name_or_id, fold, plans_name, configuration, foundation_path, settings,
                     log=lambda *_: None)
    path = buffer_file_path(inputs.dataset_name, inputs.fold, plans_name, configuration)
    fix = f"Run: medseqft select -d {inputs.dataset_name} -f {inputs.fold} -p {plans_name} -c {configuration}"
    record = _read_record(path) if os.path.isfile(path) else None
    if record is None:
        raise MedSeqFTError(f"No valid MDS buffer {path}. {fix}")
    diff = _key_differences(record.get("key"), inputs.key)
    if diff:
        raise MedSeqFTError(f"MDS buffer {path} is stale: it differs from the current inputs in {diff}. {fix} --force")
    return record


def select_buffer(dataset_name_or_id, fold, plans_name: str = "MedSeqFTPlans", configuration: str = "3d_fullres",
                  foundation_path: str | None = None, settings: MDSSettings | None = None,
                  device: str | torch.device = "cpu", progress: bool = True, force: bool = False,
                  log: Callable[[str], None] | None = print,
                  before_overwrite: Callable[[str], None] | None = None) -> dict:
    """Score the fold's training cases and write the buffer file; reuse a stored one made with the same inputs.

    foundation_path / settings default to the plans' ``medseqft`` section. ``log`` gets status lines
    (trainers can pass ``self.print_to_log_file``); ``progress`` shows a progress bar and the summary table.
    ``before_overwrite(path)`` is called before a stored buffer would be replaced, and may refuse (raise).
    """
    log = log or (lambda *_: None)
    inputs = prepare(dataset_name_or_id, fold, plans_name, configuration, foundation_path, settings, log)
    path = buffer_file_path(inputs.dataset_name, inputs.fold, plans_name, configuration)
    if os.path.exists(path):
        stored = _read_record(path)
        diff = None if stored is None else _key_differences(stored.get("key"), inputs.key)
        if stored is not None and not diff and not force:
            log(f"MDS: reusing buffer {path} (same foundation, settings and training cases): {stored['buffer']}")
            return stored
        reason = "--force" if force and not diff else \
            "unreadable or of an older format" if stored is None else f"made with other inputs ({', '.join(diff)})"
        if before_overwrite is not None:
            before_overwrite(path)
        log(f"MDS: recomputing buffer {path}: stored file is {reason}.")
    mode = f"fixed, {inputs.settings.repeats} draws" if inputs.settings.repeats else \
        f"adaptive, {inputs.settings.min_repeats}..{inputs.settings.max_repeats} draws"
    log(f"MDS: scoring {len(inputs.cases)} training cases of {inputs.dataset_name} fold {inputs.fold} "
        f"({mode}) for a buffer of K={inputs.k}")
    record = score(inputs, device, progress, report=None if progress else log)
    write_json_atomic(record, path)
    if progress:
        log(summary_table(record, case_sites(inputs.dataset_name)))
    log(f"MDS: buffer {record['buffer']}: {record['draws']} draws in {record['forward_passes']} forward passes, "
        f"{record['wall_time_s']:.1f} s -> {path}")
    return record


# ---------------------------------------------------------------- the buffer in training

def random_buffer(training_cases: list[str], k: int, seed: int) -> list[str]:
    """The MDS ablation: a seeded random buffer of the same size."""
    import numpy as np

    return sorted(np.random.default_rng(seed).choice(sorted(training_cases), size=k, replace=False).tolist())


def oversampled_identifiers(identifiers: list[str], buffer: list[str], share: float) -> tuple[list[str], int]:
    """Training identifiers with each buffer case repeated ``reps`` times, so that nnU-Net's uniform sampling
    draws a buffer case with probability ~``share``; returns (identifiers, reps)."""
    k, rest = len(buffer), len(identifiers) - len(buffer)
    reps = max(1, int(round(share * rest / (k * (1 - share))))) if rest else 1
    return sorted(list(identifiers) + [key for key in buffer for _ in range(reps - 1)]), reps
