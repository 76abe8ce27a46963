"""nnssl pre-training checkpoints (MIC-DKFZ/nnssl, the OpenMind models) as the foundation M0.

An nnssl checkpoint holds the network's ``network_weights`` and an ``nnssl_adaptation_plan`` (architecture and the
pre-training plan); the released OpenMind folders ship the plan also as ``adaptation_plan.json``. The import writes
what the rest of the plugin reads from a foundation (``method/foundation.py``): an nnU-Net checkpoint whose
``init_args`` carry nnU-Net plans for the same network (so ``medseqft plan`` gives every task that network and
preprocessing), the full network with its reconstruction head (MDS scores with it), and the SSL settings of
nnssl's objective, so that MDS computes nnssl's own loss. Format facts: ``docs/nnssl_checkpoints.md``.

Supported: CNN U-Nets (``ResEncL``, ``ResidualEncoderUNet``, ``PlainConvUNet``) trained with a block-masked MSE
objective (``BaseMAETrainer``, ``AugmentedMAETrainer`` and their variants). Refused with the reason: Primus (a transformer, not an nnU-Net
architecture), ``NoSkipResEncL`` (no skips: not nnU-Net's U-Net), contrastive checkpoints (no reconstruction
head to score with), other losses or mask styles unless their settings are given explicitly.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import torch

from nnunetv2_medseqft.checkpoints import atomic_torch_save, sha256_file
from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.method.ssl import SSLSettings

CONFIGURATION = "3d_fullres"  # the configuration name MedSeqFT's trainers and nnUNetv2_train use
DNA_UNET = "dynamic_network_architectures.architectures.unet."
_CONV, _NORM, _NONLIN = "torch.nn.modules.conv.Conv3d", "torch.nn.modules.instancenorm.InstanceNorm3d", "torch.nn.LeakyReLU"
_IMPORTED_OPS = ["conv_op", "norm_op", "dropout_op", "nonlin"]

# nnssl's architectures/architecture_registry.py, get_res_enc_l (the OpenMind ResEnc-L)
RESENC_L = {
    "n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320], "conv_op": _CONV,
    "kernel_sizes": [[3, 3, 3]] * 6, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5, "n_blocks_per_stage": [1, 3, 4, 6, 6, 6],
    "n_conv_per_stage_decoder": [1] * 5, "conv_bias": True, "norm_op": _NORM,
    "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
    "nonlin": _NONLIN, "nonlin_kwargs": {"inplace": True},
}
# nnssl's BaseMAETrainer: 16^3-voxel blocks, 75 % hidden, MSE on the hidden voxels (training/loss/mse_loss.py)
NNSSL_MAE = SSLSettings(mask_ratio=0.75, block_size=16, loss="masked_mse")
_OTHER_LOSS_TOKENS = {"SSIM", "MSSSIM", "L1", "L2", "NoMask", "wMask", "ANON"}  # other objectives than masked MSE
# nnU-Net's channel name for each normalisation (map_channel_name_to_normalization.py); CT needs the pool's
# intensity statistics, which an nnssl plan does not carry
_CHANNEL_NAME = {"ZScoreNormalization": "zscore", "NoNormalization": "noNorm",
                 "RescaleTo01Normalization": "rescale_to_0_1", "RGBTo01Normalization": "rgb_to_0_1"}
_NNSSL_SCHEME = {"RescaleTo01": "RescaleTo01Normalization", "RGBTo01": "RGBTo01Normalization"}  # nnssl's enum values


def read_nnssl(path: str) -> tuple[dict, dict, str]:
    """(checkpoint dict, adaptation plan, checkpoint file) of an nnssl output: a ``.pth`` file, or a folder with
    ``checkpoint_final.pth`` (and ``adaptation_plan.json`` where the checkpoint lacks the plan)."""
    path = os.path.abspath(path)
    folder, ckpt_file = (path, os.path.join(path, "checkpoint_final.pth")) if os.path.isdir(path) \
        else (os.path.dirname(path), path)
    if not os.path.isfile(ckpt_file):
        raise MedSeqFTError(f"No nnssl checkpoint at {ckpt_file}. Give the checkpoint_final.pth of an nnssl "
                            f"pre-training, or the folder that holds it (and its adaptation_plan.json).")
    try:
        ckpt = torch.load(ckpt_file, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 -- any unpickling failure means the same to the user
        raise MedSeqFTError(f"{ckpt_file} is unreadable or truncated ({type(e).__name__}: {e}). Re-copy it.") from e
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise MedSeqFTError(f"{ckpt_file} is not an nnssl checkpoint: no 'network_weights'.")
    plan = ckpt.get("nnssl_adaptation_plan")
    plan_file = os.path.join(folder, "adaptation_plan.json")
    if plan is None and os.path.isfile(plan_file):
        with open(plan_file) as f:
            plan = json.load(f)
    if not isinstance(plan, dict):
        raise MedSeqFTError(f"{ckpt_file} carries no nnssl adaptation plan and {plan_file} does not exist. Released "
                            f"nnssl checkpoints hold it as 'nnssl_adaptation_plan'; for your own pre-training add it "
                            f"with nnssl's utilities/add_adaptation_plan.py.")
    return ckpt, plan, ckpt_file


def architecture(plan: dict) -> dict:
    """The nnU-Net plans' ``architecture`` entry of the adaptation plan's network."""
    arch = plan.get("architecture_plans") or {}
    name = arch.get("arch_class_name")
    if name == "ResEncL":
        kwargs, cls = dict(RESENC_L), "ResidualEncoderUNet"
    elif name in ("ResidualEncoderUNet", "PlainConvUNet") and arch.get("arch_kwargs"):
        kwargs, cls = {k: v for k, v in arch["arch_kwargs"].items()}, name
        if cls == "PlainConvUNet" and "n_blocks_per_stage" in kwargs:  # nnssl's dataclass has one name for both
            kwargs["n_conv_per_stage"] = kwargs.pop("n_blocks_per_stage")
    elif str(name).startswith("Primus"):
        raise MedSeqFTError(f"The nnssl checkpoint is a {name} (a vision transformer). MedSeqFT fine-tunes nnU-Net's "
                            f"CNN U-Nets (LoRA on their convolutions, nnUNetv2_predict on the results): use a "
                            f"ResEnc-L checkpoint (OpenMind ships ResEncL MAE models).")
    elif name == "NoSkipResEncL":
        raise MedSeqFTError("The nnssl checkpoint is a NoSkipResEncL (a U-Net without skip connections), which "
                            "nnU-Net cannot build. Use a ResEncL checkpoint.")
    else:
        raise MedSeqFTError(f"Unknown nnssl architecture {name!r} (supported: ResEncL, ResidualEncoderUNet and "
                            f"PlainConvUNet with arch_kwargs).")
    return {"network_class_name": DNA_UNET + cls, "arch_kwargs": kwargs, "_kw_requires_import": list(_IMPORTED_OPS)}


def ssl_settings(trainer_name: str | None, given: dict | None = None) -> tuple[SSLSettings, str]:
    """nnssl's SSL objective as SSLSettings, and where it came from. nnssl keeps mask ratio and block size in
    the trainer class only, so they are read from its name (``BaseMAETrainer_BS8_ep1000_mask60``: ratio 0.6,
    ``..._maskblock8``: 8-voxel blocks); ``given`` (``--ssl KEY=VALUE``) overrides and is required where the
    name tells nothing reliable."""
    if given:
        return SSLSettings.from_dict({**NNSSL_MAE.to_dict(), **given}), "given"
    name = trainer_name or ""
    # BaseMAETrainer and its _variants; AugmentedMAETrainer / AugMAETrainer_* change only the augmentation
    mae = re.fullmatch(r"(BaseMAETrainer|AugmentedMAETrainer|AugMAETrainer)(_.*)?", name)
    fix = ("Give its objective explicitly if it is a block-masked MSE reconstruction, e.g. --ssl mask_ratio=0.75 "
           "block_size=16; otherwise MDS cannot score with this checkpoint.")
    if not mae:
        what = "a contrastive objective with no reconstruction head" if re.search(
            r"simclr|voco|pclr|gvsl|volumefusion", name, re.I) else "an objective this import does not know"
        raise MedSeqFTError(f"The nnssl checkpoint was trained by {name or 'an unnamed trainer'} ({what}). MDS "
                            f"scores cases by the foundation's own masked-reconstruction loss. {fix}")
    tokens = set(name.split("_")[1:])
    if tokens & _OTHER_LOSS_TOKENS:
        raise MedSeqFTError(f"{name} trains another loss than masked MSE ({sorted(tokens & _OTHER_LOSS_TOKENS)}). "
                            f"{fix}")
    ratio, block = NNSSL_MAE.mask_ratio, NNSSL_MAE.block_size
    for t in tokens:
        if m := re.fullmatch(r"maskblock(\d+)", t):
            block = int(m.group(1))
        elif m := re.fullmatch(r"mask(\d+)", t):
            ratio = int(m.group(1)) / 100
    return SSLSettings(mask_ratio=ratio, block_size=block), f"trainer name {name}"


def _pretrain_configuration(plan: dict, ckpt: dict, name: str | None) -> tuple[str, dict]:
    configs = (plan.get("pretrain_plan") or {}).get("configurations") or {}
    if name is None:  # add_adaptation_plan.py renames the configuration but keeps init_args: use it only if present
        trained = (ckpt.get("init_args") or {}).get("configuration_name")
        name = trained if trained in configs else (next(iter(configs)) if len(configs) == 1 else None)
    if name not in configs:
        raise MedSeqFTError(f"Choose the pre-training configuration with --pretrain-configuration (the plan holds "
                            f"{sorted(configs)}).")
    return name, configs[name]


def _per_channel(value, channels: int) -> list[bool]:
    """nnssl writes ``use_mask_for_norm`` as a list per channel, its own examples as one bool."""
    return [bool(v) for v in value] if isinstance(value, (list, tuple)) else [bool(value)] * channels


def _checked_patch(patch, strides) -> list[int]:
    patch = [int(p) for p in patch]
    divisor = np.prod(np.array(strides, dtype=int), axis=0)
    if len(patch) != 3 or any(p % d for p, d in zip(patch, divisor)):
        raise MedSeqFTError(f"Patch size {patch} does not suit the network: each axis must be divisible by "
                            f"{divisor.tolist()} (the product of its strides). Give --patch-size, e.g. 160 160 160.")
    return patch


def nnunet_plans(plan: dict, source: str, cfg: dict, plans_name: str, patch_size=None) -> tuple[dict, dict]:
    """nnU-Net plans (one 3d_fullres configuration) and a dataset.json for the foundation's pre-training, from the
    adaptation plan and its pre-training configuration ``source`` (``cfg``)."""
    pretrain = plan["pretrain_plan"]
    arch = architecture(plan)
    channels = int(plan.get("pretrain_num_input_channels", 1))
    schemes = [_NNSSL_SCHEME.get(s, s) for s in cfg["normalization_schemes"]]
    if len(schemes) != channels:
        raise MedSeqFTError(f"The nnssl plan lists {len(schemes)} normalisation scheme(s) for "
                            f"{channels} input channel(s); the checkpoint is inconsistent.")
    unsupported = sorted(set(schemes) - set(_CHANNEL_NAME))
    if unsupported:
        raise MedSeqFTError(f"The nnssl plan normalises with {unsupported}, which needs the pre-training pool's "
                            f"intensity statistics; nnssl does not store them. Supported: {sorted(_CHANNEL_NAME)}.")
    spacing = cfg.get("spacing")
    if spacing is None:
        raise MedSeqFTError(f"The nnssl configuration '{source}' has no target spacing (spacing style "
                            f"'{cfg.get('spacing_style')}'); downstream data could not be resampled like the "
                            f"pre-training data.")
    patch = _checked_patch(patch_size or plan.get("recommended_downstream_patchsize") or cfg["patch_size"],
                           arch["arch_kwargs"]["strides"])
    seg_kwargs = {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None}
    configuration = {
        "data_identifier": f"{plans_name}_{CONFIGURATION}", "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2, "patch_size": patch, "median_image_size_in_voxels": patch,
        "spacing": [float(s) for s in spacing], "normalization_schemes": schemes,
        "use_mask_for_norm": _per_channel(cfg.get("use_mask_for_norm"), channels),
        "resampling_fn_data": cfg.get("resampling_fn_data", "resample_data_or_seg_to_shape"),
        "resampling_fn_data_kwargs": cfg.get("resampling_fn_data_kwargs",
                                             {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}),
        "resampling_fn_seg": "resample_data_or_seg_to_shape", "resampling_fn_seg_kwargs": seg_kwargs,
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {**seg_kwargs, "is_seg": False},
        "architecture": arch, "batch_dice": False,
    }
    neutral = {"max": 1.0, "mean": 0.0, "median": 0.0, "min": -1.0, "percentile_00_5": -1.0,
               "percentile_99_5": 1.0, "std": 1.0}  # read only by CTNormalization, which is refused above
    plans = {
        "dataset_name": pretrain.get("dataset_name", "nnssl"), "plans_name": plans_name,
        "original_median_spacing_after_transp": [float(s) for s in spacing],
        "original_median_shape_after_transp": patch,
        "image_reader_writer": "SimpleITKIO",  # downstream plans take the task's own reader
        "transpose_forward": list(pretrain.get("transpose_forward", [0, 1, 2])),
        "transpose_backward": list(pretrain.get("transpose_backward", [0, 1, 2])),
        "configurations": {CONFIGURATION: configuration}, "experiment_planner_used": "medseqft import-nnssl",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {str(c): dict(neutral) for c in range(channels)},
    }
    dataset_json = {"name": plans["dataset_name"], "channel_names": {str(c): _CHANNEL_NAME[s]
                                                                     for c, s in enumerate(schemes)},
                    "labels": {"background": 0}, "numTraining": 0, "file_ending": ".nii.gz"}
    return plans, dataset_json


def _plain_keys(weights: dict) -> dict:
    """nnssl saves unwrapped state dicts; strip DDP / torch.compile prefixes all the same."""
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in weights.items()}


def import_nnssl(path: str, out_folder: str, patch_size=None, ssl: dict | None = None, plans_name: str = "nnsslPlans",
                 pretrain_configuration: str | None = None) -> str:
    """Write ``out_folder/checkpoint_final.pth``, a MedSeqFT foundation made from the nnssl checkpoint at ``path``;
    returns its path. Everything is checked (architecture, objective, plans, the weights loading strictly into the
    network nnU-Net builds from the new plans) before anything is written; an existing output is never replaced."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_medseqft.method.ssl import build_ssl_network

    out = os.path.join(os.path.abspath(out_folder), "checkpoint_final.pth")
    if os.path.exists(out):
        raise MedSeqFTError(f"{out} exists: an imported foundation is never overwritten (plans and buffers made "
                            f"with it record its sha256). Import into another folder, or delete it if unused.")
    ckpt, plan, ckpt_file = read_nnssl(path)
    trainer_name = ckpt.get("trainer_name") or plan.get("trainer_name")  # add_adaptation_plan.py writes it there too
    settings, ssl_source = ssl_settings(trainer_name, ssl)
    source, cfg = _pretrain_configuration(plan, ckpt, pretrain_configuration)
    plans, dataset_json = nnunet_plans(plan, source, cfg, plans_name, patch_size)
    patch = plans["configurations"][CONFIGURATION]["patch_size"]
    if any(p % settings.block_size for p in patch):  # nnssl's mask grid is patch // block, stretched to the patch
        raise MedSeqFTError(f"Patch size {patch} is not a multiple of the SSL block size {settings.block_size}: MDS "
                            f"could not mask like nnssl. Give --patch-size with multiples of {settings.block_size}.")
    channels = len(dataset_json["channel_names"])
    weights = _plain_keys(ckpt["network_weights"])
    pm = PlansManager(plans)
    network = build_ssl_network(pm, pm.get_configuration(CONFIGURATION), channels)
    ours = network.state_dict()
    missing, unexpected = sorted(set(ours) - set(weights)), sorted(set(weights) - set(ours))
    shapes = [k for k in set(ours) & set(weights) if ours[k].shape != weights[k].shape]
    if missing or unexpected or shapes:
        head = "no decoder / reconstruction head (a contrastive or encoder-only checkpoint?); " \
            if any(k.startswith("decoder.") for k in missing) else ""
        raise MedSeqFTError(
            f"The weights of {ckpt_file} do not fit the network of its adaptation plan: {head}"
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(shapes)} with other shapes (e.g. {sorted(shapes)[:3]}). MDS needs the full MAE network with its "
            f"reconstruction output, one per input channel.")
    network.load_state_dict(weights)
    section = {"role": "foundation", "ssl": settings.to_dict(), "num_input_channels": channels,
               "imported_from": {"format": "nnssl", "path": os.path.abspath(ckpt_file),
                                 "sha256": sha256_file(ckpt_file), "trainer_name": trainer_name,
                                 "arch_class_name": plan["architecture_plans"]["arch_class_name"],
                                 "pretrain_configuration": source, "pretrain_patch_size": cfg.get("patch_size"),
                                 "ssl_from": ssl_source,
                                 "key_to_encoder": plan.get("key_to_encoder"), "key_to_stem": plan.get("key_to_stem"),
                                 "keys_to_in_proj": list(plan.get("keys_to_in_proj") or [])}}
    foundation = {
        "network_weights": network.state_dict(), "optimizer_state": None, "grad_scaler_state": None,
        "logging": None, "_best_ema": None, "current_epoch": int(ckpt.get("current_epoch") or 0),
        "init_args": {"plans": plans, "configuration": CONFIGURATION, "fold": "all", "dataset_json": dataset_json,
                      "device": "cpu"},
        "trainer_name": f"nnssl:{trainer_name}", "inference_allowed_mirroring_axes": (0, 1, 2),
        "medseqft": section,
    }
    os.makedirs(os.path.dirname(out), exist_ok=True)
    atomic_torch_save(foundation, out)
    return out
