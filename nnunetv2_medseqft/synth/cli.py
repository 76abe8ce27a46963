"""``medseqft synth``: write the benchmark datasets (and optionally a preview PNG)."""

import argparse
import json
from collections import Counter

from nnunetv2_medseqft.synth.datasets import DEFAULT_FIRST_ID, PRESETS, TASKS, default_datasets, generate


def _defaults_table() -> str:
    rows = [
        f"  {ds.dataset_id}  {ds.name:<28} {ds.role:<7} {ds.spec.description}" for ds in default_datasets()
    ]
    return "default datasets (--first-id 500 --num-tasks 4):\n" + "\n".join(rows)


def configure_parser(parser: argparse.ArgumentParser, name: str) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        _defaults_table()
        + "\n\nSites: A/B = pool sites, C = shifted site (half of every sequential task), D = unseen site."
        + "\nEach dataset folder gets a sites.json sidecar mapping every case to its site."
    )
    parser.add_argument(
        "--out", metavar="DIR", help="nnU-Net raw folder to write into (default: $nnUNet_raw)"
    )
    parser.add_argument(
        "--preset",
        choices=list(PRESETS),
        default="bench",
        help="tiny: 8 cases/dataset (16 pool), ~32^3 voxels, seconds (unit tests); "
        "cpu: 25 cases/dataset (40 pool), ~64^3 voxels, the CPU benchmark scale (plan the pool with "
        "-pl MedSeqFTCPUPlanner); bench: 24 cases/dataset (48 pool), ~64^3 voxels (default: bench)",
    )
    parser.add_argument("--seed", type=int, default=0, help="same seed => byte-identical files (default: 0)")
    parser.add_argument(
        "--first-id",
        type=int,
        default=DEFAULT_FIRST_ID,
        help=f"id of the pool dataset; the others follow (default: {DEFAULT_FIRST_ID})",
    )
    parser.add_argument(
        "--num-tasks",
        type=int,
        default=len(TASKS),
        help=f"number of sequential tasks, 1-{len(TASKS)} (default: {len(TASKS)})",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing DatasetXXX_* folders with the same ids (nothing else is touched)",
    )
    parser.add_argument(
        "--preview", metavar="PNG", help="also write a PNG of centre slices with label contours"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    folders = generate(
        args.out, preset=args.preset, seed=args.seed, first_id=args.first_id, num_tasks=args.num_tasks,
        overwrite=args.overwrite, log=print,
    )  # fmt: skip
    if args.preview:
        from nnunetv2_medseqft.synth.preview import write_preview  # matplotlib only when asked for

        print(f"preview: {write_preview(folders.values(), args.preview)}")
    print(f"\n{'id':>4}  {'dataset':<28} {'role':<7} {'cases':>5}  sites")
    for dataset_id, folder in folders.items():
        sidecar = json.loads((folder / "sites.json").read_text())
        sites = ", ".join(f"{site} x{n}" for site, n in sorted(Counter(sidecar["cases"].values()).items()))
        print(f"{dataset_id:>4}  {folder.name:<28} {sidecar['role']:<7} {len(sidecar['cases']):>5}  {sites}")
    return 0
