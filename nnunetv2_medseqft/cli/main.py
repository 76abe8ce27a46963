"""``medseqft``: one entry point, one subcommand per task (argparse, like nnU-Net's CLIs).

Each subcommand lives in its own module, which exposes ``configure_parser(parser)``; that
function declares the arguments and sets ``func`` (called with the parsed namespace).
"""

import argparse
import importlib
import sys

from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.threads import apply_torch_threads

# subcommand -> (module, one-line help)
SUBCOMMANDS = {
    "env": ("nnunetv2_medseqft.plugin.discovery", "print the nnUNet_extTrainer export line for this install"),
    "register": ("nnunetv2_medseqft.plugin.discovery", "write lazy shims into nnunetv2 so -tr/-pl find our classes"),
    "unregister": ("nnunetv2_medseqft.plugin.discovery", "remove the shims written by 'register'"),
    "synth": ("nnunetv2_medseqft.synth.cli", "generate the multi-task CT-like benchmark datasets"),
    "import-nnssl": ("nnunetv2_medseqft.cli.import_nnssl",
                     "use an nnssl (OpenMind) pre-training checkpoint as the foundation M0"),
    "adapt-foundation": ("nnunetv2_medseqft.cli.adapt_foundation",
                         "adapt a foundation to a task's input channels (another count, or its normalisation)"),
    "plan": ("nnunetv2_medseqft.cli.plan", "plan + preprocess datasets with the foundation's plans (MedSeqFTPlanner)"),
    "select": ("nnunetv2_medseqft.cli.select",
               "score training cases with the foundation's SSL loss and write the MDS buffer"),
    "run": ("nnunetv2_medseqft.cli.run", "feed datasets through a method one task at a time (resumable), then evaluate"),
    "evaluate": ("nnunetv2_medseqft.cli.run", "re-score every finished model of a run (Dice, HD95, R matrix)"),
    "report": ("nnunetv2_medseqft.reports.report", "write report.md and plots for one or more runs"),
    "compare": ("nnunetv2_medseqft.reports.report", "one table across methods and seeds (mean +- sd)"),
    "chain": ("nnunetv2_medseqft.reports.chain_pack", "pack a run's task models as LoRA deltas on the foundation, or unpack them"),
    "analyze": ("nnunetv2_medseqft.reports.analysis", "loss landscapes and parameter variation of a run's task models"),
    "demo": ("nnunetv2_medseqft.reports.demo", "CPU-scale end-to-end demo: data, foundation, medseqft vs seqfft vs parallel, report"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medseqft",
        description="MedSeqFT for nnU-Net v2: sequential fine-tuning of 3D segmentation foundation models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).configure_parser(p, name)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv[1:]  # the subcommand's own arguments (a resumable command is printed from them)
    try:
        apply_torch_threads()
        result = args.func(args)
    except MedSeqFTError as e:
        print(f"medseqft {args.command}: error: {e}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
