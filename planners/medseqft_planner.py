"""MedSeqFTPlanner: plan a downstream dataset so that its network is exactly the foundation's.

nnU-Net's "move plans" route in one step: the foundation's plans (architecture, patch size,
target spacing, normalisation and its intensity statistics) with this dataset's name and reader,
plus a ``medseqft`` section recording the foundation (path, sha256, SSL settings) and the MDS
settings. The preprocessor stays nnU-Net's DefaultPreprocessor, so stock ``nnUNetv2_predict``
works on every result.

Stock route: ``MEDSEQFT_FOUNDATION=/path/checkpoint_final.pth nnUNetv2_plan_and_preprocess -d D
-pl MedSeqFTPlanner -c 3d_fullres`` (after ``medseqft register``), which also leaves the MDS buffer of
every fold (``mds_hook.py``); or ``medseqft plan``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil

from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2_medseqft.planners.mds_hook import hook_folds, is_stock_plan_and_preprocess, schedule_buffers

from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.method.foundation import (
    Foundation,
    architecture_mismatches,
    check_channels,
    describe_network,
    load_foundation,
)
from nnunetv2_medseqft.method.settings import MDSSettings

FOUNDATION_ENV = "MEDSEQFT_FOUNDATION"
DEFAULT_PLANS_NAME = "MedSeqFTPlans"


def check_replan(foundation: Foundation, dataset_name: str, plans_name: str) -> None:
    """Existing plans of this name with another network (another foundation or scale) are not overwritten:
    models trained with them, and their preprocessed data, would no longer match."""
    existing = join(nnUNet_preprocessed, dataset_name, plans_name + ".json")
    if not os.path.isfile(existing):
        return
    with open(existing) as f:
        old = json.load(f)
    cfg = foundation.configuration
    if cfg in old.get("configurations", {}) and not architecture_mismatches(old, cfg, foundation.plans, cfg):
        return
    raise MedSeqFTError(
        f"{dataset_name} is already planned as '{plans_name}' with another network than the foundation's:\n"
        f"  existing: {describe_network(old, cfg)} (foundation {old.get('medseqft', {}).get('foundation', {}).get('path')})\n"
        f"  foundation {foundation.path}: {describe_network(foundation.plans, cfg)}\n"
        f"Re-planning would orphan models trained with the existing plans. Plan under another name: "
        f"medseqft plan -d {dataset_name} --foundation {foundation.path} --plans-name {plans_name}_2 "
        f"(or delete {existing} if nothing was trained with it).")


def foundation_compatible_plans(foundation: Foundation, dataset_name: str, plans_name: str,
                                image_reader_writer: str, mds: MDSSettings | None = None) -> dict:
    plans = copy.deepcopy(foundation.plans)
    source_name = plans["plans_name"]
    for cfg in plans["configurations"].values():
        if "data_identifier" in cfg:
            ident = cfg["data_identifier"]
            cfg["data_identifier"] = plans_name + ident[len(source_name):] if ident.startswith(source_name) \
                else f"{plans_name}_{ident}"
        if cfg.get("preprocessor_name", "DefaultPreprocessor") != "DefaultPreprocessor":
            raise MedSeqFTError(
                f"The foundation's plans use preprocessor '{cfg['preprocessor_name']}'; MedSeqFT keeps nnU-Net's "
                f"DefaultPreprocessor so that stock nnUNetv2_predict works. Pre-train the foundation with default plans.")
    plans.update(dataset_name=dataset_name, plans_name=plans_name, image_reader_writer=image_reader_writer,
                 experiment_planner_used="MedSeqFTPlanner")
    plans["medseqft"] = {"foundation": foundation.provenance(), "mds": (mds or MDSSettings()).to_dict()}
    return plans


class MedSeqFTPlanner(ExperimentPlanner):
    def __init__(self, dataset_name_or_id, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str = DEFAULT_PLANS_NAME,
                 overwrite_target_spacing=None, suppress_transpose: bool = False,
                 foundation: str | Foundation | None = None, mds: MDSSettings | None = None):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
        if overwrite_target_spacing is not None:
            raise MedSeqFTError("MedSeqFTPlanner takes the spacing from the foundation; drop -overwrite_target_spacing.")
        if preprocessor_name != "DefaultPreprocessor":
            raise MedSeqFTError("MedSeqFTPlanner keeps DefaultPreprocessor (stock nnUNetv2_predict must work); "
                                "drop -preprocessor_name.")
        foundation = foundation or os.environ.get(FOUNDATION_ENV)
        if not foundation:
            raise MedSeqFTError(
                f"MedSeqFTPlanner needs the foundation checkpoint: set {FOUNDATION_ENV}=/path/to/checkpoint_final.pth "
                f"(written by MedSeqFTPretrainTrainer) or use `medseqft plan -d D --foundation PATH`.")
        self.foundation = foundation if isinstance(foundation, Foundation) else load_foundation(foundation)
        self.mds = mds

    def plan_experiment(self):
        hook_folds()  # a bad MEDSEQFT_MDS_FOLDS fails before anything is written
        check_channels(self.foundation, self.dataset_json, self.dataset_name)
        if is_stock_plan_and_preprocess():  # medseqft plan checks the cases itself, before fingerprinting
            from nnunetv2.configuration import default_num_processes

            from nnunetv2_medseqft.raw_checks import check_raw_dataset

            for w in check_raw_dataset(self.dataset_name, default_num_processes):
                print(f"WARNING {self.dataset_name}: {w}")
        check_replan(self.foundation, self.dataset_name, self.plans_identifier)
        # nnU-Net's preprocessing reads dataset.json from the preprocessed folder
        os.makedirs(join(nnUNet_preprocessed, self.dataset_name), exist_ok=True)
        shutil.copy(join(self.raw_dataset_folder, "dataset.json"),
                    join(nnUNet_preprocessed, self.dataset_name, "dataset.json"))
        plans = foundation_compatible_plans(self.foundation, self.dataset_name, self.plans_identifier,
                                            self.determine_reader_writer().__name__, self.mds)
        self.plans = plans
        self.save_plans(plans)
        if is_stock_plan_and_preprocess():
            schedule_buffers(self.dataset_name, plans)
        return plans
