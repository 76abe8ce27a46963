"""Checkpoints in nnssl's exact format (MIC-DKFZ/nnssl 7044864), at test widths, without nnssl installed.

What ``AbstractTrainer.save_checkpoint`` writes for a ``BaseMAETrainer``: the unwrapped ``state_dict`` of a
dynamic-network-architectures U-Net with one reconstruction output per input channel, and the
``nnssl_adaptation_plan`` as ``AdaptationPlan.serialize()`` returns it (ops as dotted class paths, the pre-training
``Plan`` with its one configuration)."""

from __future__ import annotations

import torch
from torch import nn


def tiny_resenc_kwargs(features=(4, 8, 16)) -> dict:
    n = len(features)
    return {"n_stages": n, "features_per_stage": list(features), "kernel_sizes": [[3, 3, 3]] * n,
            "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1), "n_blocks_per_stage": [1] * n,
            "n_conv_per_stage_decoder": [1] * (n - 1), "conv_bias": True,
            "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin_kwargs": {"inplace": True}}


# nnssl's get_res_enc_l (architectures/architecture_registry.py), written out here so that the import's own
# preset is checked against nnssl's values, not against itself
NNSSL_RESENC_L = {"n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320],
                  "kernel_sizes": [[3, 3, 3] for _ in range(6)],
                  "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
                  "n_blocks_per_stage": [1, 3, 4, 6, 6, 6], "n_conv_per_stage_decoder": [1, 1, 1, 1, 1],
                  "conv_bias": True, "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "nonlin_kwargs": {"inplace": True}}


def serialized(kwargs: dict) -> dict:
    """DynamicArchitecturePlans.serialize(): the op classes as ``module.ClassName``."""
    return {**kwargs, "conv_op": "torch.nn.modules.conv.Conv3d",
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "nonlin": "torch.nn.modules.activation.LeakyReLU"}


def resenc(kwargs: dict, channels: int = 1) -> nn.Module:
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    return ResidualEncoderUNet(input_channels=channels, num_classes=channels, conv_op=nn.Conv3d,
                               norm_op=nn.InstanceNorm3d, nonlin=nn.LeakyReLU, deep_supervision=False, **kwargs)


def adaptation_plan(arch_class_name: str, arch_kwargs: dict | None, spacing, patch_size, channels: int = 1) -> dict:
    config = {"data_identifier": "nnsslPlans_onemmiso", "preprocessor_name": "DefaultPreprocessor",
              "spacing_style": "onemmiso", "normalization_schemes": ["ZScoreNormalization"] * channels,
              "use_mask_for_norm": [False] * channels, "resampling_fn_data": "resample_data_or_seg_to_shape",
              "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
              "resampling_fn_mask": "resample_data_or_seg_to_shape",
              "resampling_fn_mask_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
              "spacing": list(spacing), "patch_size": list(patch_size)}
    return {
        "architecture_plans": {"arch_class_name": arch_class_name, "arch_kwargs": arch_kwargs,
                               "arch_kwargs_requiring_import": ["conv_op", "norm_op", "nonlin"] if arch_kwargs else None},
        "pretrain_plan": {"dataset_name": "Dataset745_OpenMind", "plans_name": "nnsslPlans",
                          "original_median_spacing_after_transp": list(spacing), "image_reader_writer": "NibabelReaderWriter",
                          "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
                          "configurations": {"onemmiso": config}, "experiment_planner_used": "ExperimentPlanner"},
        "pretrain_num_input_channels": channels, "recommended_downstream_patchsize": list(patch_size),
        "key_to_encoder": "encoder.stages", "key_to_stem": "encoder.stem",
        "keys_to_in_proj": ["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"], "key_to_lpe": None,
    }


def write_checkpoint(path, network: nn.Module, plan: dict, trainer_name: str = "BaseMAETrainer_BS8",
                     with_plan: bool = True) -> None:
    """A released nnssl checkpoint: ``add_adaptation_plan.py`` dropped optimizer, scaler, logging, epoch and
    ``_best_ema``, renamed the plan's configuration to ``onemmiso`` and kept ``init_args`` (so the training's own
    configuration name, 3d_fullres, stays there)."""
    ckpt = {"network_weights": network.state_dict(),
            "init_args": {"plan": plan["pretrain_plan"], "configuration_name": "3d_fullres", "fold": 0,
                          "pretrain_json": {}, "device": torch.device("cpu")}, "trainer_name": trainer_name}
    if with_plan:
        ckpt["nnssl_adaptation_plan"] = plan
    torch.save(ckpt, path)
