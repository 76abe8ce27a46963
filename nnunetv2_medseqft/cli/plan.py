"""``medseqft plan``: fingerprint, foundation-compatible plans (MedSeqFTPlanner) and preprocessing in one step."""

from __future__ import annotations

import os

from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.paths import dataset_name


def plan_dataset(dataset_name_or_id, foundation, configuration: str = "3d_fullres", num_processes: int = 2,
                 plans_name: str | None = None, mds=None, warn=print) -> str:
    """Plan + preprocess one dataset with the foundation's plans; returns the plans name."""
    return plan_datasets([dataset_name_or_id], foundation, configuration, num_processes, plans_name, mds, warn)


def plan_datasets(datasets: list, foundation, configuration: str = "3d_fullres", num_processes: int = 2,
                  plans_name: str | None = None, mds=None, warn=print) -> str:
    """Several datasets in one fingerprinting and one preprocessing call (nnU-Net's worker pools start once).

    ``foundation``: its checkpoint path or the loaded ``Foundation`` (loaded once for every dataset and planner).
    Every training case is checked first (``raw_checks``): a broken case is refused, named, before any work;
    ``warn`` gets what trains but not as planned (background-only labels, cases smaller than the patch)."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, preprocess
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    from nnunetv2_medseqft.method.foundation import Foundation, check_channels, load_foundation
    from nnunetv2_medseqft.paths import raw_dataset, raw_root
    from nnunetv2_medseqft.planners.medseqft_planner import DEFAULT_PLANS_NAME, MedSeqFTPlanner
    from nnunetv2_medseqft.raw_checks import check_raw_dataset, small_geometry_warnings

    names = [dataset_name(d) for d in datasets]
    m0 = foundation if isinstance(foundation, Foundation) else load_foundation(foundation)
    for name in names:  # channels and modality first: a refusal costs no fingerprinting
        check_channels(m0, raw_dataset(name)[1], name)
    for name in names:
        for w in check_raw_dataset(name, num_processes):
            warn(f"WARNING {name}: {w}")
    ids = [int(name[len("Dataset"):len("Dataset") + 3]) for name in names]
    extract_fingerprints(ids, num_processes=num_processes, check_dataset_integrity=False, clean=False, verbose=False)
    identifier = None
    for name, dataset_id in zip(names, ids):
        planner = MedSeqFTPlanner(dataset_id, plans_name=plans_name or DEFAULT_PLANS_NAME, foundation=m0,
                                  mds=mds)
        plans = planner.plan_experiment()
        if configuration not in plans["configurations"]:
            raise MedSeqFTError(f"The foundation's plans have no configuration '{configuration}' "
                                f"(available: {sorted(plans['configurations'])}).")
        cases = list(get_filenames_of_train_images_and_targets(os.path.join(raw_root(), name), raw_dataset(name)[1]))
        for w in small_geometry_warnings(plans, configuration, planner.dataset_fingerprint, cases):
            warn(f"WARNING {name}: {w}")
        identifier = planner.plans_identifier
    preprocess(ids, identifier, configurations=(configuration,), num_processes=(num_processes,), verbose=False)
    return identifier


def run(args) -> int:
    for d in args.d:
        plans_name = plan_dataset(d, args.foundation, args.c, args.np, args.plans_name)
        print(f"{dataset_name(d)}: planned with the foundation's plans as '{plans_name}' and preprocessed "
              f"({args.c}). Train with: nnUNetv2_train {d} {args.c} FOLD -tr MedSeqFTTrainer -p {plans_name} "
              f"-pretrained_weights PREVIOUS_MODEL/checkpoint_final.pth")
    return 0


def configure_parser(parser, name: str) -> None:
    parser.add_argument("-d", nargs="+", required=True, help="dataset id(s) or name(s) in $nnUNet_raw")
    parser.add_argument("--foundation", required=True,
                        help="foundation checkpoint_final.pth (MedSeqFTPretrainTrainer, medseqft import-nnssl or "
                             "adapt-foundation)")
    parser.add_argument("-c", default="3d_fullres", help="configuration to preprocess (default: 3d_fullres)")
    parser.add_argument("-np", type=int, default=2, help="processes for fingerprinting/preprocessing (default: 2)")
    parser.add_argument("--plans-name", default=None, help="plans identifier to write (default: MedSeqFTPlans)")
    parser.add_argument("--verify_dataset_integrity", action="store_true",
                        help="accepted for nnU-Net's muscle memory: every case is always checked before planning")
    parser.set_defaults(func=run)
