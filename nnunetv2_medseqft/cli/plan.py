"""``medseqft plan``: fingerprint, foundation-compatible plans (MedSeqFTPlanner) and preprocessing in one step."""

from __future__ import annotations

from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.paths import dataset_name


def plan_dataset(dataset_name_or_id, foundation: str, configuration: str = "3d_fullres", num_processes: int = 2,
                 plans_name: str | None = None, verify_dataset_integrity: bool = False, mds=None) -> str:
    """Plan + preprocess one dataset with the foundation's plans; returns the plans name."""
    return plan_datasets([dataset_name_or_id], foundation, configuration, num_processes, plans_name,
                         verify_dataset_integrity, mds)


def plan_datasets(datasets: list, foundation: str, configuration: str = "3d_fullres", num_processes: int = 2,
                  plans_name: str | None = None, verify_dataset_integrity: bool = False, mds=None) -> str:
    """Several datasets in one fingerprinting and one preprocessing call (nnU-Net's worker pools start once)."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, preprocess

    from nnunetv2_medseqft.planners.medseqft_planner import DEFAULT_PLANS_NAME, MedSeqFTPlanner

    ids = [int(dataset_name(d)[len("Dataset"):len("Dataset") + 3]) for d in datasets]
    extract_fingerprints(ids, num_processes=num_processes, check_dataset_integrity=verify_dataset_integrity,
                         clean=False, verbose=False)
    identifier = None
    for dataset_id in ids:
        planner = MedSeqFTPlanner(dataset_id, plans_name=plans_name or DEFAULT_PLANS_NAME, foundation=foundation,
                                  mds=mds)
        plans = planner.plan_experiment()
        if configuration not in plans["configurations"]:
            raise MedSeqFTError(f"The foundation's plans have no configuration '{configuration}' "
                                f"(available: {sorted(plans['configurations'])}).")
        identifier = planner.plans_identifier
    preprocess(ids, identifier, configurations=(configuration,), num_processes=(num_processes,), verbose=False)
    return identifier


def run(args) -> int:
    for d in args.d:
        plans_name = plan_dataset(d, args.foundation, args.c, args.np, args.plans_name, args.verify_dataset_integrity)
        print(f"{dataset_name(d)}: planned with the foundation's plans as '{plans_name}' and preprocessed "
              f"({args.c}). Train with: nnUNetv2_train {d} {args.c} FOLD -tr MedSeqFTTrainer -p {plans_name} "
              f"-pretrained_weights PREVIOUS_MODEL/checkpoint_final.pth")
    return 0


def configure_parser(parser, name: str) -> None:
    parser.add_argument("-d", nargs="+", required=True, help="dataset id(s) or name(s) in $nnUNet_raw")
    parser.add_argument("--foundation", required=True,
                        help="foundation checkpoint_final.pth written by MedSeqFTPretrainTrainer")
    parser.add_argument("-c", default="3d_fullres", help="configuration to preprocess (default: 3d_fullres)")
    parser.add_argument("-np", type=int, default=2, help="processes for fingerprinting/preprocessing (default: 2)")
    parser.add_argument("--plans-name", default=None, help="plans identifier to write (default: MedSeqFTPlans)")
    parser.add_argument("--verify_dataset_integrity", action="store_true",
                        help="run nnU-Net's dataset integrity check first")
    parser.set_defaults(func=run)
