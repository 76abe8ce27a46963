"""peft LoRA on nnU-Net networks: injection (with the ``all_modules`` re-link), trainable set, merge, adapter files.

Trap: ``ConvDropoutNormReLU.forward`` runs ``self.all_modules``, a Sequential holding the ORIGINAL
conv; peft replaces only the ``.conv`` attribute, so LoRA has no effect until ``all_modules[0]``
points at the new ``.conv`` again. After ``merge_and_unload`` the same re-link restores the
stock module tree (identical state_dict keys).
"""

from __future__ import annotations

import math
import os
import re

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Conv3d as LoraConv3d
from safetensors.torch import save_file

from nnunetv2_medseqft.errors import MedSeqFTError

NORM_TYPES = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)
TRAINED_EXTRAS_FILE = "norms_and_head.safetensors"


def relink_conv_blocks(network: torch.nn.Module) -> None:
    for m in network.modules():
        seq = getattr(m, "all_modules", None)
        if isinstance(seq, torch.nn.Sequential) and hasattr(m, "conv") and len(seq) and seq[0] is not m.conv:
            seq[0] = m.conv


def _check_rank(network: torch.nn.Module, rank: int, targets: str) -> None:
    """A conv's update B @ A has rank <= min(in_channels * kernel volume, out_channels): a larger r only wastes."""
    for name, m in network.named_modules():
        if isinstance(m, torch.nn.Conv3d) and re.fullmatch(targets, name):
            limit = min(m.in_channels * math.prod(m.kernel_size), m.out_channels)
            if rank > limit:
                raise MedSeqFTError(
                    f"LoRA rank {rank} exceeds what {name} ({m.in_channels} -> {m.out_channels} channels, kernel "
                    f"{tuple(m.kernel_size)}) can use ({limit}). Set lora_rank <= {limit} in the plans' medseqft.rft "
                    f"section or pick a smaller-rank trainer variant.")


def is_norm_or_head(name: str, module: torch.nn.Module) -> bool:
    return isinstance(module, NORM_TYPES) or ".seg_layers." in f".{name}."


class MergedWeightConv3d(LoraConv3d):
    """peft's LoRA Conv3d, computed as ONE convolution with W + scale * B A.

    peft's branch runs two extra convolutions on the activations (k^3 conv to r channels, 1x1x1 back),
    in float32 under autocast; for 3D feature maps that costs several times the frozen conv itself.
    The merged weight is tiny to form, gradients reach A and B through it, and the result is
    mathematically identical (no LoRA dropout). peft's merge/save/load see an ordinary LoRA layer."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.base_layer
        if self.disable_adapters or self.merged or not self.active_adapters:
            return base(x)
        weight = base.weight
        for name in self.active_adapters:
            weight = weight + self.get_delta_weight(name).to(weight.dtype)
        return base._conv_forward(x, weight, base.bias)


def add_lora(network: torch.nn.Module, rank: int, alpha: float, targets: str,
             merged_weight_forward: bool = True) -> PeftModel:
    """Freeze ``network``, add LoRA to the target convs; LoRA factors, norm affines and the head train."""
    _check_rank(network, rank, targets)
    student = get_peft_model(network, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                                 target_modules=targets))
    if merged_weight_forward:
        for m in student.modules():
            if type(m) is LoraConv3d:
                m.__class__ = MergedWeightConv3d
    relink_conv_blocks(student)
    for p in student.parameters():
        p.requires_grad_(False)
    for name, m in student.named_modules():
        if is_norm_or_head(name, m) or "lora_" in name:
            for p in m.parameters(recurse=False):
                p.requires_grad_(True)
    return student


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
