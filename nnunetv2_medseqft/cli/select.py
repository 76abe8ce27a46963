"""``medseqft select``: score a fold's training cases with the foundation's SSL loss and write the MDS buffer."""

from __future__ import annotations

import dataclasses
import json
import os

from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.method.settings import MDSSettings


def planned_settings(dataset_name_or_id, plans_name: str) -> MDSSettings:
    """The MDS settings recorded in the plans (``medseqft.mds``), else the defaults."""
    from nnunetv2_medseqft.paths import dataset_name, preprocessed_root

    path = os.path.join(preprocessed_root(), dataset_name(dataset_name_or_id), f"{plans_name}.json")
    if not os.path.isfile(path):
        return MDSSettings()  # select_buffer raises the 'run medseqft plan' error
    with open(path) as f:
        section = (json.load(f).get("medseqft") or {}).get("mds") or {}
    return MDSSettings.from_dict(section)


def settings_from_args(args, base: MDSSettings) -> MDSSettings:
    """Command-line overrides on top of the plans' settings."""
    changes = {}
    if args.k is not None:
        changes["k"] = args.k
    if args.k_frac is not None:
        changes.update(k=None, k_frac=args.k_frac)
    if args.repeats is not None:
        changes["repeats"] = args.repeats
    if args.max_repeats is not None:
        changes.update(repeats=None, max_repeats=args.max_repeats)
    if args.min_repeats is not None:
        changes["min_repeats"] = args.min_repeats
    elif args.max_repeats is not None:
        changes["min_repeats"] = min(base.min_repeats, args.max_repeats)  # a small cap lowers the floor too
    if args.seed is not None:
        changes["seed"] = args.seed
    return dataclasses.replace(base, **changes)


def run(args) -> int:
    from nnunetv2_medseqft.method.buffer import select_buffer
    from nnunetv2_medseqft.sequence.run_record import refuse_if_recorded

    if args.repeats is not None and (args.max_repeats is not None or args.min_repeats is not None):
        raise MedSeqFTError("--repeats (fixed mode) and --min-repeats/--max-repeats (adaptive mode) exclude each "
                            "other: give one of them.")
    settings = settings_from_args(args, planned_settings(args.d, args.p))

    def keep_run_buffers(path: str) -> None:
        refuse_if_recorded(path, "MDS buffer", f"To score with other settings, plan under your own plans name "
                           f"(medseqft plan -d {args.d} --plans-name NAME, then medseqft select -p NAME) or start "
                           "a new medseqft run.")

    record = select_buffer(args.d, args.f, plans_name=args.p, configuration=args.c, foundation_path=args.foundation,
                           settings=settings, device=args.device, progress=True, force=args.force,
                           before_overwrite=keep_run_buffers)
    print(" ".join(record["buffer"]))
    return 0


def configure_parser(parser, name: str) -> None:
    parser.add_argument("-d", required=True, help="dataset id or name (planned with `medseqft plan`)")
    parser.add_argument("-f", required=True, help="fold: 0-4 or 'all'; only its training cases are scored")
    parser.add_argument("-p", default="MedSeqFTPlans", help="plans identifier (default: MedSeqFTPlans)")
    parser.add_argument("-c", default="3d_fullres", help="configuration (default: 3d_fullres)")
    parser.add_argument("--foundation", default=None,
                        help="foundation checkpoint (default: the one recorded in the plans)")
    k = parser.add_mutually_exclusive_group()
    k.add_argument("--k", type=int, default=None, help="buffer size (default: from the plans, 20%% of the fold)")
    k.add_argument("--k-frac", type=float, default=None, help="buffer size as a fraction of the training cases")
    parser.add_argument("--repeats", type=int, default=None,
                        help="fixed number of SSL draws per case (default: adaptive, see --max-repeats)")
    parser.add_argument("--min-repeats", type=int, default=None, help="adaptive mode: draws every case gets first")
    parser.add_argument("--max-repeats", type=int, default=None,
                        help="adaptive mode: most draws per case (default from the plans: 1000)")
    parser.add_argument("--seed", type=int, default=None, help="seed of patches and masks (default from the plans: 0)")
    parser.add_argument("-device", "--device", default="cpu", choices=("cpu", "cuda", "mps"),
                        help="device for the foundation's forward passes (default: cpu)")
    parser.add_argument("--force", action="store_true", help="recompute even if a valid buffer file exists")
    parser.set_defaults(func=run)
