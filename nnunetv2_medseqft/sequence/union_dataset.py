"""The multitask reference's dataset: every task's cases in one nnU-Net raw dataset.

Label sets differ between tasks (liver in one, spleen in another). The union dataset gives every
(task, label) its own value, in task order; a case keeps only its own task's annotations, so an organ
that a case shows but its task did not annotate counts as background (the plain merge: partial labels
are not modelled, which penalises the multitask model on organs that other tasks' cases contain).
Images are linked, not copied. The fold's split is the union of every task's own split, so each
validation case is the same as in the sequential runs, and each task is evaluated by mapping the
union prediction back to its labels (``label_map_for``).
"""

from __future__ import annotations

import os

from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.jsonio import read_json, write_json_atomic
from nnunetv2_medseqft.paths import raw_root, taken_dataset_ids

UNION_KEY = "medseqft_union"  # dataset.json section: which task each label came from


def union_labels(datasets: list[str]) -> tuple[dict, dict]:
    """dataset.json labels of the union, and per task: its label value -> union value."""
    labels, mapping = {"background": 0}, {}
    for d in datasets:
        task_labels = read_json(os.path.join(raw_root(), d, "dataset.json"))["labels"]
        mapping[d] = {}
        for name, value in task_labels.items():
            if value == 0 or name == "ignore":
                continue
            if not isinstance(value, int):
                raise MedSeqFTError(f"{d}: region label '{name}' cannot be merged into a multitask dataset.")
            union_name = name if name not in labels else f"{d}_{name}"
            labels[union_name] = len(labels)
            mapping[d][value] = labels[union_name]
    return labels, mapping


def task_key(name: str) -> str:
    """``DatasetXXX`` of a task's dataset name or of a union case's name: which task annotated the case."""
    return name[:10]


def union_case(dataset: str, case: str) -> str:
    """A task's case in the union, named so that ``task_key`` tells its task."""
    return f"{task_key(dataset)}_{case}"


def unannotated_labels(union_json: dict) -> dict[str, list[int]]:
    """``task_key`` of a union case -> the union label values its task did not annotate."""
    section = union_json.get(UNION_KEY)
    if not section:
        raise MedSeqFTError(f"{union_json.get('name', 'This dataset')} is not a multitask union dataset (its "
                            f"dataset.json has no '{UNION_KEY}' section): the multitask trainer trains the union "
                            "that `medseqft run --method multitask` builds.")
    every = {int(v) for v in union_json["labels"].values() if isinstance(v, int) and v > 0}
    return {task_key(d): sorted(every - {int(u) for u in section["label_maps"][d].values()}) for d in section["tasks"]}


def label_map_for(union_json: dict, dataset: str) -> dict[int, int]:
    """Union prediction value -> the task's own label value (others become background)."""
    return {u: int(t) for t, u in union_json[UNION_KEY]["label_maps"][dataset].items()}


def build_union_dataset(datasets: list[str], run_name: str, fold, base_plans: str, configuration: str,
                        dataset_id: int | None = None) -> str:
    """Write ``DatasetXXX_Union-<run>`` (raw) and its fold split; returns its name."""
    import numpy as np
    import SimpleITK as sitk

    from nnunetv2_medseqft.paths import fold_split, preprocessed_root

    if dataset_id is None:
        free = sorted(set(range(1, 1000)) - taken_dataset_ids())
        if not free:
            raise MedSeqFTError("No free dataset id left for the multitask union dataset: pass --union-id.")
        dataset_id = free[-1]
    elif dataset_id in taken_dataset_ids():
        raise MedSeqFTError(f"Dataset id {dataset_id} is taken: choose a free --union-id.")
    name = f"Dataset{dataset_id:03d}_Union-{run_name}"
    folder = os.path.join(raw_root(), name)
    os.makedirs(os.path.join(folder, "imagesTr"), exist_ok=True)
    os.makedirs(os.path.join(folder, "labelsTr"), exist_ok=True)
    labels, mapping = union_labels(datasets)
    first = read_json(os.path.join(raw_root(), datasets[0], "dataset.json"))
    ending = first["file_ending"]
    split = {"train": [], "val": []}
    for d in datasets:
        dj = read_json(os.path.join(raw_root(), d, "dataset.json"))
        plans = read_json(os.path.join(preprocessed_root(), d, f"{base_plans}.json"))
        data_folder = os.path.join(preprocessed_root(), d, plans["configurations"][configuration]["data_identifier"])
        train, val = fold_split(os.path.join(preprocessed_root(), d), data_folder, fold, log=lambda *a: None)
        lut = np.zeros(max(list(mapping[d]) + [0]) + 1, dtype=np.uint8)
        for t, u in mapping[d].items():
            lut[t] = u
        for case in train + val:
            new = union_case(d, case)
            for c in range(len(dj["channel_names"])):
                src = os.path.join(raw_root(), d, "imagesTr", f"{case}_{c:04d}{ending}")
                dst = os.path.join(folder, "imagesTr", f"{new}_{c:04d}{ending}")
                if not os.path.lexists(dst):
                    os.symlink(os.path.abspath(src), dst)
            image = sitk.ReadImage(os.path.join(raw_root(), d, "labelsTr", case + ending))
            relabelled = sitk.GetImageFromArray(lut[sitk.GetArrayFromImage(image)])
            relabelled.CopyInformation(image)
            sitk.WriteImage(relabelled, os.path.join(folder, "labelsTr", new + ending), True)
            split["train" if case in train else "val"].append(new)
    write_json_atomic({"channel_names": first["channel_names"], "labels": labels, "file_ending": ending,
                       "numTraining": len(split["train"]) + len(split["val"]), "name": name,
                       UNION_KEY: {"tasks": list(datasets), "label_maps": {d: {str(t): u for t, u in m.items()}
                                                                          for d, m in mapping.items()}}},
                      os.path.join(folder, "dataset.json"))
    pre = os.path.join(preprocessed_root(), name)
    os.makedirs(pre, exist_ok=True)
    # nnU-Net reads fold F of splits_final.json; every fold index gets the same union split
    fold_index = 0 if fold == "all" else int(fold)
    write_json_atomic([split] * max(5, fold_index + 1), os.path.join(pre, "splits_final.json"))
    return name
