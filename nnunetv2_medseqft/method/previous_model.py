"""The previous-stage model M_{t-1} of a task step: where it came from and whether it fits the plans.

nnU-Net loads ``-pretrained_weights`` itself and does not tell the trainer the path, so the path
is read from the command line (``nnUNetv2_train ... -pretrained_weights PATH``) or from the plans'
``medseqft.previous_model`` (set by ``medseqft run``); the loaded weights are hashed either way.
"""

from __future__ import annotations

import sys

from nnunetv2_medseqft.checkpoints import load_checkpoint_file, sha256_file
from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.method.foundation import architecture_mismatches, describe_network
from nnunetv2_medseqft.paths import resolved


def previous_model_path(plans: dict, argv: list[str] | None = None) -> str | None:
    argv = sys.argv if argv is None else argv
    if "-pretrained_weights" in argv:
        i = argv.index("-pretrained_weights")
        if i + 1 < len(argv):
            return argv[i + 1]
    return resolved(plans.get("medseqft", {}).get("previous_model"))  # ``$nnUNet_results/...`` as runs record it


def check_previous_model(path: str, plans: dict, configuration: str, trainer_name: str,
                         what: str = "-pretrained_weights") -> dict:
    """Refuse a model (M_{t-1}, or a given F_t) of another architecture before nnU-Net's loader fails
    with a bare assertion; returns its provenance."""
    ckpt = load_checkpoint_file(path, what=f"model given as {what}")
    args = ckpt["init_args"]
    diff = architecture_mismatches(args["plans"], args["configuration"], plans, configuration)
    if diff:
        dataset = plans.get("dataset_name")
        raise MedSeqFTError(
            f"{trainer_name}: {what} {path} has another architecture than these plans ({', '.join(diff)} differ):\n"
            f"  the model: {describe_network(args['plans'], args['configuration'])}\n"
            f"  these plans: {describe_network(plans, configuration)} ({dataset})\n"
            f"Plan {dataset} with the plans of the foundation that model descends from, under a name of its own, and "
            f"train with it: medseqft plan -d {dataset} --foundation FOUNDATION/checkpoint_final.pth --plans-name "
            f"MedSeqFTPlans_other, then -p MedSeqFTPlans_other. Nothing was trained or written.")
    return {"path": path, "sha256": sha256_file(path), "trainer_name": ckpt.get("trainer_name")}
