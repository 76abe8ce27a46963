"""``medseqft run`` and ``medseqft evaluate``: the command lines of ``sequence.runner``."""

from __future__ import annotations

from nnunetv2_medseqft.cpu_precision import check_cpu_bf16_setting
from nnunetv2_medseqft.method.foundation import M0_TRANSFERS
from nnunetv2_medseqft.sequence.recipes import METHODS
from nnunetv2_medseqft.sequence.request import request_from_args
from nnunetv2_medseqft.sequence.runner import evaluate_run, run_sequence


def _evaluate_cmd(args) -> int:
    folder = evaluate_run(args.run, out=args.out)
    print(f"results: {folder}/results.json")
    return 0


def run(args) -> int:
    check_cpu_bf16_setting()  # a bad MEDSEQFT_CPU_BF16 is named now, not by the first training after planning and MDS
    request = request_from_args(args)
    if request.m0_transfer == "full":
        warn_inactive_head_inputs(request.foundation)
    run_sequence(request)
    return 0


def warn_inactive_head_inputs(foundation_path: str) -> None:
    """A warning, not an error: the foundation is usable, but tasks started from it in full may not learn."""
    import os
    import sys

    from nnunetv2_medseqft.errors import MedSeqFTError
    from nnunetv2_medseqft.method.foundation import inactive_head_inputs, load_foundation

    if not os.path.isfile(foundation_path):
        return  # the run's own checks name the problem
    try:
        found = inactive_head_inputs(load_foundation(foundation_path))
    except MedSeqFTError:
        return
    if found and found[0] * 2 >= found[1]:
        print(f"Warning: {found[0]} of the {found[1]} channels of the foundation's last decoder stage (what a "
              "segmentation head reads) are inactive (LeakyReLU's negative slope on > 95% of voxels): tasks started "
              "from M0 in full may not learn small structures. Consider --m0-transfer encoder (README: Scales).",
              file=sys.stderr, flush=True)


def configure_parser(parser, name: str) -> None:
    if name == "evaluate":
        parser.add_argument("run", metavar="RUN", help="run name (under $nnUNet_results/medseqft_runs) or folder")
        parser.add_argument("-o", "--out", metavar="DIR", default=None,
                            help="write results.json and the overlays to DIR; the run folder and the nnU-Net roots "
                                 "are only read (a read-only archive, a colleague's run)")
        parser.set_defaults(func=_evaluate_cmd)
        return
    parser.add_argument("--foundation", required=True, help="foundation checkpoint_final.pth (MedSeqFTPretrainTrainer, "
                        "medseqft import-nnssl or adapt-foundation)")
    parser.add_argument("--datasets", nargs="+", required=True, help="dataset ids or names, in task order")
    parser.add_argument("--unseen", nargs="*", default=[], help="unseen datasets for the transfer test")
    parser.add_argument("--method", default="medseqft", choices=sorted(METHODS),
                        help="; ".join(f"{m.name}: {m.description}" for m in METHODS.values()))
    parser.add_argument("--name", required=True, help="run name: results under $nnUNet_results/medseqft_runs/NAME")
    parser.add_argument("--fold", default="0", help="fold of nnU-Net's 5-fold split (default 0) or 'all'")
    parser.add_argument("--seed", type=int, default=0, help="seed of the run (MDS draws, random buffer, head init)")
    parser.add_argument("-c", default="3d_fullres", help="configuration (default 3d_fullres)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per training (default: nnU-Net's 1000)")
    parser.add_argument("--iterations", type=int, default=None, help="iterations per epoch (default: 250)")
    parser.add_argument("--warmup-epochs", type=int, default=None,
                        help="full fine-tuning (stage A) starts with this many epochs of linear learning-rate warm-up, "
                             "then nnU-Net's poly schedule over the rest (default 0: nnU-Net's schedule)")
    parser.add_argument("--val-iterations", type=int, default=None, help="validation iterations per epoch (50)")
    parser.add_argument("--no-mirroring", action="store_true",
                        help="train without nnU-Net's mirroring augmentation, as nnUNetTrainerNoMirroring does (for "
                             "anatomy whose sides differ: a mirrored abdomen puts the liver where the spleen is)")
    # action=extend: a repeated --rft / --mds adds to the settings instead of silently replacing them
    parser.add_argument("--rft", nargs="*", action="extend", metavar="KEY=VALUE",
                        help="K&G RFT settings, e.g. lambda_g=0.5 lora_rank=4 (see README, Settings)")
    parser.add_argument("--mds", nargs="*", action="extend", metavar="KEY=VALUE",
                        help="MDS settings, e.g. repeats=64 k=4")
    parser.add_argument("--mirror", action="store_true", help="evaluate with test-time mirroring (8x slower in 3D)")
    parser.add_argument("--nnunet-validation", action="store_true",
                        help="also run nnU-Net's own final validation after each training (the run scores every "
                             "model itself, so it is off by default)")
    parser.add_argument("-device", "--device", default="cpu", choices=("cpu", "cuda", "mps"),
                        help="device for training and evaluation (default cpu)")
    parser.add_argument("--m0-transfer", default="full", choices=M0_TRANSFERS,
                        help="what a task started from the foundation M0 receives: full = all but the output head "
                             "(stock -pretrained_weights), encoder = M0's encoder with a freshly initialised, seeded "
                             "decoder (how nnssl fine-tunes; its reconstruction decoder can hurt segmentation, "
                             "README: Scales)")
    parser.add_argument("--union-id", type=int, default=None,
                        help="multitask: dataset id for the union dataset (default: the highest free id)")
    parser.set_defaults(func=run)
