"""The previous-stage model M_{t-1} of a task step: where it came from and whether it fits the plans.

nnU-Net loads ``-pretrained_weights`` itself and does not tell the trainer the path, so the path
is read from the command line (``nnUNetv2_train ... -pretrained_weights PATH``) or from the plans'
``medseqft.previous_model`` (set by ``medseqft run``); the loaded weights are hashed either way.
"""

from __future__ import annotations

import hashlib
import sys

import torch

from nnunetv2_medseqft.checkpointing import load_checkpoint_file, sha256_file
from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.foundation import architecture_mismatches


def previous_model_path(plans: dict, argv: list[str] | None = None) -> str | None:
    argv = sys.argv if argv is None else argv
    if "-pretrained_weights" in argv:
        i = argv.index("-pretrained_weights")
        if i + 1 < len(argv):
            return argv[i + 1]
    return plans.get("medseqft", {}).get("previous_model")


def check_previous_model(path: str, plans: dict, configuration: str, trainer_name: str,
                         what: str = "-pretrained_weights") -> dict:
    """Refuse a model (M_{t-1}, or a given F_t) of another architecture before nnU-Net's loader fails
    with a bare assertion; returns its provenance."""
    ckpt = load_checkpoint_file(path, what=f"model given as {what}")
    args = ckpt["init_args"]
    diff = architecture_mismatches(args["plans"], args["configuration"], plans, configuration)
    if diff:
        raise MedSeqFTError(
            f"{trainer_name}: {what} {path} has another architecture than these plans "
            f"({', '.join(diff)} differ). Plan this dataset with the foundation's plans: "
            f"medseqft plan -d {plans.get('dataset_name')} --foundation FOUNDATION/checkpoint_final.pth, "
            f"then train with -p MedSeqFTPlans.")
    return {"path": path, "sha256": sha256_file(path), "trainer_name": ckpt.get("trainer_name")}


def state_fingerprint(state_dict: dict) -> str:
    """Content hash of weights (ignores the task-specific segmentation head)."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        if ".seg_layers." not in k:
            h.update(k.encode())
            h.update(state_dict[k].detach().cpu().to(torch.float32).numpy().tobytes())
    return h.hexdigest()
