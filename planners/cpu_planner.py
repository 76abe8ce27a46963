"""MedSeqFTCPUPlanner: nnU-Net's default planning with a network and patch that learn within minutes on a CPU.

``nnUNetv2_plan_and_preprocess -d POOL -pl MedSeqFTCPUPlanner -c 3d_fullres`` (after ``medseqft register``)
writes ``MedSeqFTCPUPlans.json``. Everything that nnU-Net derives from the data (target spacing,
normalisation, intensity statistics, pooling per axis, kernel sizes) stays nnU-Net's; only three
budget knobs change, as nnU-Net's own ResEnc planners change theirs:

- features 8 -> 64 instead of 32 -> 320 (about 0.1x the fwd+bwd time of the default at the same patch),
- the patch edge is at most ``MAX_PATCH_EDGE`` voxels per axis (the GPU-memory rule would pick the
  whole image, and data augmentation of a large patch dominates a CPU iteration),
- batch size 2 (nnU-Net's minimum).

Downstream tasks inherit these plans from the foundation (``medseqft plan``), so one option decides
the scale of the whole chain. The preprocessor is nnU-Net's DefaultPreprocessor: stock
``nnUNetv2_predict`` works on every model.

``MedSeqFTResEncCPUPlanner`` applies the same knobs to nnU-Net's recommended residual-encoder preset
(``nnUNetPlannerResEncM``: ``ResidualEncoderUNet``, 1-3-4-6 blocks per encoder stage) and writes
``MedSeqFTResEncCPUPlans.json``: the ResEnc route at CPU cost.
"""

from __future__ import annotations

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import (
    nnUNetPlannerResEncM,
)

CPU_PLANS_NAME = "MedSeqFTCPUPlans"
RESENC_CPU_PLANS_NAME = "MedSeqFTResEncCPUPlans"
MAX_PATCH_EDGE = 32
BASE_FEATURES = 8
MAX_FEATURES = 64
BATCH_SIZE = 2


class _CPUKnobs:
    """The three budget knobs, on top of any nnU-Net planner (the class after this one in the bases)."""

    def __init__(self, dataset_name_or_id, gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = "DefaultPreprocessor", plans_name: str | None = None,
                 overwrite_target_spacing=None, suppress_transpose: bool = False):
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name,
                         plans_name or self.default_plans_name, overwrite_target_spacing, suppress_transpose)
        self.UNet_base_num_features = BASE_FEATURES
        self.UNet_max_features_3d = MAX_FEATURES
        self.UNet_max_features_2d = MAX_FEATURES

    def get_plans_for_configuration(self, spacing, median_shape, data_identifier, approximate_n_voxels_dataset,
                                    _cache: dict) -> dict:
        # nnU-Net clips its initial patch to the median image shape; clipping that shape caps the patch
        # while every other rule (divisibility, pooling per axis, aspect ratio) stays nnU-Net's
        capped = np.minimum(np.asarray(median_shape), MAX_PATCH_EDGE)
        plan = super().get_plans_for_configuration(spacing, capped, data_identifier, approximate_n_voxels_dataset,
                                                   _cache)
        plan["median_image_size_in_voxels"] = median_shape
        plan["batch_size"] = BATCH_SIZE
        return plan


class MedSeqFTCPUPlanner(_CPUKnobs, ExperimentPlanner):
    default_plans_name = CPU_PLANS_NAME


class MedSeqFTResEncCPUPlanner(_CPUKnobs, nnUNetPlannerResEncM):
    default_plans_name = RESENC_CPU_PLANS_NAME

    def generate_data_identifier(self, configuration_name: str) -> str:
        # ResEnc planners share nnUNetPlans' folders; these plans keep their own, like MedSeqFTCPUPlans
        return f"{self.plans_identifier}_{configuration_name}"
