"""Where nnU-Net keeps things, for this plugin: the environment roots, dataset id <-> name, folds and the
fold split. The one copy; everything else asks here.

nnU-Net reads ``$nnUNet_raw`` / ``$nnUNet_preprocessed`` / ``$nnUNet_results`` once at import
(``nnunetv2.paths``); these functions read the environment at call time, so that a process that sets
them late (the demo, the benchmarks, the tests) is served too, and fail with a message that says what to set.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np

from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.jsonio import read_json, write_json_atomic

SPLIT_SEED = 12345  # nnUNetTrainer.do_split
_ROOTS = {
    "nnUNet_raw": "the folder that holds DatasetXXX_Name/ with imagesTr, labelsTr and dataset.json",
    "nnUNet_preprocessed": "the folder where nnU-Net writes plans and preprocessed data",
    "nnUNet_results": "the folder where nnU-Net writes trained models",
}


def _root(var: str) -> str:
    root = os.environ.get(var)
    if not root:
        raise MedSeqFTError(f"${var} is not set: export it ({_ROOTS[var]}).")
    return root


def raw_root() -> str:
    return _root("nnUNet_raw")


def portable(path: str) -> str:
    """A path as a record keeps it: ``$nnUNet_results/...`` (or raw, preprocessed) where it lies inside a root, so
    that a run copied or moved together with its roots still finds its files; else absolute."""
    path = os.path.abspath(path)
    for var in ("nnUNet_results", "nnUNet_preprocessed", "nnUNet_raw"):
        root = os.environ.get(var)
        if root and os.path.commonpath([path, os.path.abspath(root)]) == os.path.abspath(root):
            return os.path.join(f"${var}", os.path.relpath(path, os.path.abspath(root)))
    return path


def resolved(path: str | None) -> str | None:
    """A recorded path on this machine: the ``$nnUNet_*`` prefix of ``portable`` expanded from the environment."""
    if not path or not path.startswith("$nnUNet_"):
        return path
    var, _, rest = path[1:].partition(os.sep)
    return os.path.join(_root(var), rest)


def require_writable(var: str) -> str:
    """The root ``$var``, created if needed and checked by writing a file (permissions and read-only mounts
    alike, also for root); MedSeqFTError before any work if that fails."""
    import tempfile

    root = _root(var)
    try:
        os.makedirs(root, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".medseqft_write_test"):
            pass
    except OSError as e:
        raise MedSeqFTError(f"${var} ({root}) is not writable ({e.strerror or e}). Point ${var} to a folder you can "
                            f"write ({_ROOTS[var]}); nothing was written.") from None
    return root


def preprocessed_root() -> str:
    return _root("nnUNet_preprocessed")


def results_root() -> str:
    return _root("nnUNet_results")


def taken_dataset_ids() -> set[int]:
    """Dataset ids used in any of the three roots (a new dataset must avoid all of them)."""
    ids = set()
    for var in _ROOTS:
        root = os.environ.get(var)
        if root and os.path.isdir(root):
            ids |= {int(d[7:10]) for d in os.listdir(root) if d.startswith("Dataset") and d[7:10].isdigit()}
    return ids


# ---------------------------------------------------------------- datasets

def dataset_name(dataset_name_or_id) -> str:
    """``DatasetXXX_Name`` of an id or name, as nnU-Net resolves it (raw, preprocessed or results)."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        return maybe_convert_to_dataset_name(str(dataset_name_or_id))
    except (RuntimeError, ValueError) as e:
        raise MedSeqFTError(f"Unknown dataset {dataset_name_or_id}: {e} Check the id, $nnUNet_raw and "
                            "$nnUNet_preprocessed.") from e


def raw_dataset(dataset_name_or_id) -> tuple[str, dict]:
    """Name and dataset.json of a dataset in $nnUNet_raw, with clear errors for what nnU-Net needs."""
    raw = raw_root()
    text = str(dataset_name_or_id)
    if text.isdigit():
        prefix = f"Dataset{int(text):03d}_"
        hits = sorted(d for d in os.listdir(raw) if d.startswith(prefix)) if os.path.isdir(raw) else []
    else:
        hits = [text] if os.path.isdir(os.path.join(raw, text)) else []
    if len(hits) != 1:
        known = sorted(d for d in os.listdir(raw) if d.startswith("Dataset")) if os.path.isdir(raw) else []
        raise MedSeqFTError(f"Dataset {text} is {'ambiguous' if hits else 'not'} in $nnUNet_raw ({raw}). "
                            f"Known: {', '.join(known) or 'none'}. Give an id or a DatasetXXX_Name folder there.")
    name = hits[0]
    folder = os.path.join(raw, name)
    json_file = os.path.join(folder, "dataset.json")
    missing = [p for p in ("dataset.json", "imagesTr", "labelsTr") if not os.path.exists(os.path.join(folder, p))]
    if missing:
        raise MedSeqFTError(f"{folder} is not an nnU-Net raw dataset: {', '.join(missing)} missing. See nnU-Net's "
                            "dataset_format.md (dataset.json, imagesTr/CASE_0000.ext, labelsTr/CASE.ext).")
    try:
        dataset_json = read_json(json_file)
    except ValueError as e:
        raise MedSeqFTError(f"{json_file} is not valid JSON ({e}).") from e
    keys = [k for k in ("labels", "file_ending", "numTraining") if k not in dataset_json]
    if keys or not (dataset_json.get("channel_names") or dataset_json.get("modality")):
        raise MedSeqFTError(f"{json_file} lacks {', '.join(keys or ['channel_names'])}: nnU-Net v2 needs "
                            "channel_names, labels, numTraining and file_ending.")
    return name, dataset_json


def raw_dataset_json(dataset: str) -> dict:
    """dataset.json of a raw dataset already resolved by name."""
    return read_json(os.path.join(raw_root(), dataset, "dataset.json"))


def case_sites(dataset_name_or_id) -> dict[str, str]:
    """{case: site} from the ``sites.json`` sidecar next to the raw dataset.json, if there is one."""
    raw = os.environ.get("nnUNet_raw")
    if not raw:
        return {}
    path = os.path.join(raw, dataset_name(dataset_name_or_id), "sites.json")
    try:
        with open(path) as f:
            return dict(json.load(f).get("cases", {}))
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}


def model_folder(dataset: str, trainer: str, plans: str, configuration: str, fold) -> str:
    """nnU-Net's results layout: ``$nnUNet_results/DATASET/TRAINER__PLANS__CONFIG/fold_F``."""
    return os.path.join(results_root(), dataset, f"{trainer}__{plans}__{configuration}", f"fold_{fold}")


# ---------------------------------------------------------------- folds

def parse_fold(fold) -> int | str:
    if fold == "all":
        return "all"
    try:
        value = int(fold)
    except (TypeError, ValueError):
        value = -1
    if value < 0 or str(fold).strip() != str(value):
        raise MedSeqFTError(f"Bad fold {fold!r}: use an integer >= 0 (0-4 for nnU-Net's 5-fold split) or 'all'.")
    return value


def fold_split(dataset_folder: str, data_folder: str, fold: int | str,
               log: Callable = print) -> tuple[list[str], list[str]]:
    """(training, validation) case ids of a fold, exactly as nnUNetTrainer.do_split chooses them."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    all_keys = sorted(infer_dataset_class(data_folder).get_identifiers(data_folder))
    if fold == "all":
        return all_keys, all_keys
    splits_file = os.path.join(dataset_folder, "splits_final.json")
    if os.path.isfile(splits_file):
        with open(splits_file) as f:
            splits = json.load(f)
    else:
        try:
            splits = generate_crossval_split(all_keys, seed=SPLIT_SEED, n_splits=5)
        except ValueError as e:  # sklearn: fewer cases than folds
            raise MedSeqFTError(f"Cannot make nnU-Net's 5-fold split of {len(all_keys)} cases ({e}). "
                                "Use fold 'all' or write your own splits_final.json.") from e
        splits = [{k: [str(c) for c in v] for k, v in s.items()} for s in splits]
        write_json_atomic(splits, splits_file)  # the same file nnUNetTrainer would write at first training
        log(f"created nnU-Net's 5-fold split {splits_file}")
    if fold < len(splits):
        keys = [str(k) for k in splits[fold]["train"]]
        val = [str(k) for k in splits[fold]["val"]]
    else:  # nnU-Net's seeded 80:20 split for folds beyond the split file
        rnd = np.random.RandomState(seed=SPLIT_SEED + fold)
        idx_tr = rnd.choice(len(all_keys), int(len(all_keys) * 0.8), replace=False)
        keys = [all_keys[i] for i in idx_tr]
        val = [all_keys[i] for i in sorted(set(range(len(all_keys))) - set(idx_tr))]
    missing = sorted((set(keys) | set(val)) - set(all_keys))
    if missing:
        raise MedSeqFTError(f"splits_final.json names cases without preprocessed data in {data_folder}: "
                            f"{missing[:5]}. Re-run medseqft plan, or fix/delete {splits_file}.")
    return sorted(keys), sorted(val)


def training_cases(dataset_folder: str, data_folder: str, fold: int | str, log: Callable = print) -> list[str]:
    """The fold's training case ids, exactly as nnUNetTrainer.do_split chooses them (splits_final.json)."""
    return fold_split(dataset_folder, data_folder, fold, log)[0]


def fold_training_count(dataset: str, fold) -> int:
    """How many training cases nnU-Net's split gives the fold: from splits_final.json where it exists, else as
    nnU-Net will make it (sklearn's 5-fold KFold of numTraining cases; the first n % 5 folds validate one more)."""
    split_file = os.path.join(preprocessed_root(), dataset, "splits_final.json")
    n = int(raw_dataset_json(dataset)["numTraining"])
    if fold == "all":
        return n
    n_folds = 5
    if os.path.isfile(split_file):
        splits = read_json(split_file)
        if fold < len(splits):
            return len(splits[fold]["train"])
        n_folds = len(splits)
    if fold >= n_folds:
        return int(n * 0.8)  # nnU-Net's seeded 80:20 split beyond the split file's folds
    return n - (n // 5 + (1 if fold < n % 5 else 0))
