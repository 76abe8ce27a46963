"""Scores kept next to the validation data, so that weights scored once are not predicted again.

The runs of one demo or benchmark score the same weights several times: the shared full fine-tuning of M0 on a
task is parallel FFT's and seqFFT's model of it and MedSeqFT's F_t, and the R matrices of those runs score the
foundation's body under the same heads. A score is kept as ``<nnUNet_preprocessed>/<dataset>/medseqft_scores/
<key>.json`` (and the overlay slice it drew, ``<key>.npz``), where the key hashes everything that decides it: the
weights (segmentation head included), the label map, the configuration as planned, each validation case with the
size and modification time of its preprocessed properties and ground-truth files (preprocessing again makes new
keys), the predictor's settings and device type, and the versions of nnU-Net and of this format (raised when
scoring changes). Deleting the folder is always safe: it only costs the predictions again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

from nnunetv2_medseqft.checkpoints import state_fingerprint
from nnunetv2_medseqft.jsonio import read_json, write_json_atomic

SCORES_FOLDER = "medseqft_scores"
FORMAT = 1


def _file_stamp(path: str) -> list:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


class ScoreCache:
    """The scores of one validation set (``context``: what decides them besides the weights and label map)."""

    def __init__(self, dataset_folder: str, context: dict):
        self.folder = os.path.join(dataset_folder, SCORES_FOLDER)
        self._context = json.dumps({"format": FORMAT, **context}, sort_keys=True, default=str)

    @staticmethod
    def case_stamps(data_folder: str, gt_folder: str, file_ending: str, case_ids: list[str]) -> dict:
        """Each case's preprocessed properties and ground-truth files, by size and modification time."""
        return {k: _file_stamp(os.path.join(data_folder, f"{k}.pkl")) + _file_stamp(
            os.path.join(gt_folder, k + file_ending)) for k in case_ids}

    def key(self, state_dict: dict, label_map: dict[int, int] | None) -> str:
        h = hashlib.sha256(self._context.encode())
        h.update(state_fingerprint(state_dict, include_head=True).encode())
        h.update(json.dumps(sorted((label_map or {}).items())).encode())
        return h.hexdigest()[:32]

    def get(self, key: str, overlay: str | None = None) -> dict | None:
        """The kept scores, or None; with ``overlay``, only an entry that drew its overlay (copied there)."""
        path = os.path.join(self.folder, f"{key}.json")
        try:
            entry = read_json(path)
        except (OSError, ValueError):  # none yet, or unreadable: scored again
            return None
        if not isinstance(entry, dict):  # not one of ours
            return None
        if overlay:
            if not entry.get("overlay"):
                return None
            kept = os.path.join(self.folder, f"{key}.npz")
            if os.path.isfile(kept):  # none drawn: the raw image was not there (validation.py)
                _copy_atomic(kept, overlay)
        return entry.get("scores")

    def put(self, key: str, scores: dict, overlay: str | None = None) -> None:
        os.makedirs(self.folder, exist_ok=True)
        if overlay and os.path.isfile(overlay):
            _copy_atomic(overlay, os.path.join(self.folder, f"{key}.npz"))
        write_json_atomic({"scores": scores, "overlay": bool(overlay)}, os.path.join(self.folder, f"{key}.json"))


def _copy_atomic(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    tmp = f"{dst}.tmp-{os.getpid()}.npz"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
