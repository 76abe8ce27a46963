"""Checks of a raw nnU-Net dataset before it is planned: every broken case named, with the fix.

nnU-Net's own per-case check (``check_cases``: NaN, shapes, spacings, channel count, geometry warnings) runs
on every training case, plus what it misses: infinite intensities, label values that are not integers or not
declared in dataset.json (nnU-Net trains on those without a word), constant images. Broken data otherwise
surfaces deep inside preprocessing or a data-loader worker, as a traceback that names no case.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import redirect_stdout
from multiprocessing import get_context

import numpy as np

from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.paths import raw_dataset, raw_root

MAX_LISTED = 5  # cases named per problem; the rest are counted


def _check_case(case: str, images: list[str], label: str, channels: int, reader, labels: list[int]) -> tuple:
    """(case, errors, warnings) of one training case."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import check_cases

    errors, warnings = [], []
    printed = io.StringIO()
    with redirect_stdout(printed):
        ok = check_cases(images, label, channels, reader)
    text = " ".join(printed.getvalue().split())
    if not ok:
        errors.append(text.split(" Image files:")[0].split(" Images:")[0] or "nnU-Net's integrity check failed")
    elif text:
        warnings.append(text.split(" Image files:")[0])
    data, _ = reader().read_images(images)
    if ok and not np.all(np.isfinite(data)):
        errors.append("the image holds infinite values (replace them with a value of the image's range)")
    elif ok and float(np.nanmax(data)) == float(np.nanmin(data)):
        warnings.append("the image is constant (every voxel the same value)")
    seg, _ = reader().read_seg(label)
    values = np.unique(seg)
    if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
        errors.append(f"the label file holds non-integer values (e.g. {values[values != np.round(values)][:3]})")
    else:
        unexpected = sorted(int(v) for v in values if int(v) not in labels)
        if unexpected:
            errors.append(f"the label file holds values {unexpected} that dataset.json does not declare "
                          f"(declared: {labels})")
        elif len(values) == 1 and values[0] == 0:
            warnings.append("the label file is background only")
    return case, errors, warnings


def check_raw_dataset(dataset: str, num_processes: int = 2) -> list[str]:
    """Every training case of a raw dataset checked; MedSeqFTError naming each broken case, else the warnings."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    name, dj = raw_dataset(dataset)
    folder = os.path.join(raw_root(), name)
    where = f"{name} ({folder})"
    cases = get_filenames_of_train_images_and_targets(folder, dj)
    if len(cases) != dj.get("numTraining"):
        raise MedSeqFTError(f"{where}: dataset.json says numTraining={dj.get('numTraining')}, imagesTr holds "
                            f"{len(cases)} cases. Set numTraining to the number of cases.")
    missing = [f for c in cases.values() for f in c["images"] + [c["label"]] if not os.path.isfile(f)]
    if missing:
        raise MedSeqFTError(f"{where}: {len(missing)} files that dataset.json implies are missing, e.g. "
                            f"{', '.join(missing[:MAX_LISTED])}. Every case needs one image per channel "
                            f"(CASE_XXXX{dj['file_ending']}) and a label in labelsTr.")
    manager = LabelManager(dj["labels"], regions_class_order=dj.get("regions_class_order"))
    labels = sorted({int(v) for v in manager.all_labels + ([manager.ignore_label] if manager.has_ignore_label else [])})
    reader = determine_reader_writer_from_dataset_json(dj, next(iter(cases.values()))["images"][0])
    jobs = [(k, v["images"], v["label"], len(dj["channel_names"]), reader, labels) for k, v in sorted(cases.items())]
    if num_processes > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(num_processes, len(jobs)), mp_context=get_context("spawn")) as pool:
            results = list(pool.map(_check_case, *zip(*jobs)))
    else:
        results = [_check_case(*job) for job in jobs]
    broken = [(case, errors) for case, errors, _ in results if errors]
    if broken:
        lines = "\n".join(f"  {case}: {'; '.join(errors)}" for case, errors in broken[:MAX_LISTED])
        more = f"\n  ... and {len(broken) - MAX_LISTED} more" if len(broken) > MAX_LISTED else ""
        raise MedSeqFTError(f"{where}: {len(broken)} of {len(jobs)} training cases are broken:\n{lines}{more}\n"
                            "Fix these files (or dataset.json), then run the same command again; nothing was "
                            "planned or trained.")
    return [f"{case}: {w}" for case, _, warnings in results for w in warnings]


def small_geometry_warnings(plans: dict, configuration: str, fingerprint: dict, case_names: list[str]) -> list[str]:
    """Cases that are smaller than half the plans' patch along an axis after resampling: nnU-Net pads them, so
    most of what the foundation sees of them is padding. A warning: such data trains, but not as planned."""
    cfg = plans["configurations"][configuration]
    spacing, patch = np.asarray(cfg["spacing"], float), np.asarray(cfg["patch_size"], float)
    small = []
    for case, shape, case_spacing in zip(case_names, fingerprint["shapes_after_crop"], fingerprint["spacings"]):
        resampled = np.asarray(shape, float) * np.asarray(case_spacing, float) / spacing
        axis = int(np.argmin(resampled / patch))
        if resampled[axis] < 0.5 * patch[axis]:
            small.append(f"{case} ({resampled[axis]:.0f} voxels along axis {axis}, patch {patch[axis]:.0f})")
    if not small:
        return []
    return [f"{len(small)} of {len(case_names)} cases are smaller than half the foundation's patch after resampling "
            f"to its spacing {cfg['spacing']}: {', '.join(small[:MAX_LISTED])}"
            f"{' ...' if len(small) > MAX_LISTED else ''}. nnU-Net pads them; expect the foundation to transfer "
            "less. A foundation planned for this geometry (a smaller patch) fits better."]
