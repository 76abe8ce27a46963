"""peft LoRA on nnU-Net networks, peft's verbs: add (injection + trainable set), merge (in place, or as a state
dict without touching the student), save the adapter files, and rebuild a merged network from them."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import warnings

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Conv3d as LoraConv3d
from safetensors.torch import save_file

from nnunetv2_medseqft.adapters.layer import MergedWeightConv3d, relink_conv_blocks
from nnunetv2_medseqft.checkpoints import is_head_key
from nnunetv2_medseqft.errors import MedSeqFTError

NORM_TYPES = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)
TRAINED_EXTRAS_FILE = "norms_and_head.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"  # peft's file name


def check_rank(network: torch.nn.Module, rank: int, targets: str) -> None:
    """A conv's update B @ A has rank <= min(in_channels * kernel volume, out_channels): a larger r only wastes."""
    try:
        pattern = re.compile(targets)
    except re.error as e:
        raise MedSeqFTError(f"lora_targets {targets!r} is not a regular expression ({e}).") from None
    for name, m in network.named_modules():
        if isinstance(m, torch.nn.Conv3d) and pattern.fullmatch(name):
            limit = min(m.in_channels * math.prod(m.kernel_size), m.out_channels)
            if rank > limit:
                raise MedSeqFTError(
                    f"LoRA rank {rank} exceeds what {name} ({m.in_channels} -> {m.out_channels} channels, kernel "
                    f"{tuple(m.kernel_size)}) can use ({limit}). Set lora_rank <= {limit} (medseqft run --rft "
                    f"lora_rank={limit}, or the plans' medseqft.rft section, or a smaller-rank trainer variant).")


def is_norm_or_head(name: str, module: torch.nn.Module) -> bool:
    return isinstance(module, NORM_TYPES) or is_head_key(name)


def add_lora(network: torch.nn.Module, rank: int, alpha: float, targets: str,
             merged_weight_forward: bool = True) -> PeftModel:
    """Freeze ``network``, add LoRA to the target convs; LoRA factors, norm affines and the head train."""
    check_rank(network, rank, targets)
    student = get_peft_model(network, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                                 target_modules=targets))
    if merged_weight_forward:
        use_merged_weight_layers(student)
    relink_conv_blocks(student)
    for p in student.parameters():
        p.requires_grad_(False)
    for name, m in student.named_modules():
        if is_norm_or_head(name, m) or "lora_" in name:
            for p in m.parameters(recurse=False):
                p.requires_grad_(True)
    return student


def use_merged_weight_layers(student: PeftModel) -> None:
    """peft's LoRA Conv3d layers as ``MergedWeightConv3d`` (same parameters and files, one convolution)."""
    for m in student.modules():
        if type(m) is LoraConv3d:
            m.__class__ = MergedWeightConv3d


def merged_state_dict(student: PeftModel) -> dict:
    """State dict of the merged plain network, computed per LoRA layer without modifying the student."""
    from peft.tuners.lora import LoraLayer

    state = {}
    # every alias (encoder.* / decoder.encoder.*, .conv / .all_modules.0) of a LoRA layer
    lora_layers = {name: m for name, m in student.base_model.model.named_modules(remove_duplicate=False)
                   if isinstance(m, LoraLayer)}
    for key, value in student.base_model.model.state_dict().items():
        if "lora_" in key:
            continue
        layer_name, _, leaf = key.rpartition(".")
        owner = layer_name.removesuffix(".base_layer")
        if owner in lora_layers and layer_name.endswith(".base_layer") and leaf == "weight":
            value = value + lora_layers[owner].get_delta_weight("default").to(value.dtype)
        state[key.replace(".base_layer.", ".")] = value.detach().clone()
    return state


def merge(student: PeftModel) -> torch.nn.Module:
    """Merge LoRA into the weights and drop peft: the stock module tree, as nnU-Net builds it."""
    network = student.merge_and_unload()
    relink_conv_blocks(network)
    return network


def save_adapter(student: PeftModel, folder: str) -> None:
    """peft's adapter files plus the trained norm/head parameters: with M_{t-1} they rebuild M_t."""
    os.makedirs(folder, exist_ok=True)
    student.save_pretrained(folder)
    extras = {name: p.detach().cpu().contiguous() for name, p in student.base_model.model.named_parameters()
              if p.requires_grad and "lora_" not in name}
    save_file(extras, os.path.join(folder, TRAINED_EXTRAS_FILE))


def merged_from_files(network: torch.nn.Module, adapter_config: dict, adapter_state: dict, extras: dict) -> dict:
    """Merged weights of ``network`` (M_(t-1) with the task's head loaded) plus a saved adapter: peft's own
    loading path (adapter_config.json + adapter_model.safetensors), the trained norms/head, then ``merge``."""
    with tempfile.TemporaryDirectory(prefix="medseqft-adapter-") as tmp:
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(adapter_config, f)
        save_file({k: v.contiguous() for k, v in adapter_state.items()}, os.path.join(tmp, ADAPTER_FILE))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            student = PeftModel.from_pretrained(network, tmp)
        use_merged_weight_layers(student)  # its delta weight also for 1x1x1 kernels
    for w in caught:  # the decoder's alias of the encoder (same modules) is "missing" from peft's file: expected
        if "missing adapter keys" not in str(w.message) or any(
                "decoder.encoder." not in k for k in re.findall(r"'([^']+)'", str(w.message))):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    relink_conv_blocks(student)
    result = student.base_model.model.load_state_dict(extras, strict=False)
    if result.unexpected_keys:
        raise MedSeqFTError(f"Trained norms/head do not fit the network: {result.unexpected_keys[:3]} ...")
    return merge(student).state_dict()
