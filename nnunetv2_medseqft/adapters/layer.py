"""The LoRA layer on an nnU-Net conv, and the one trap of nnU-Net's conv blocks.

Trap: ``ConvDropoutNormReLU.forward`` runs ``self.all_modules``, a Sequential holding the ORIGINAL
conv; peft replaces only the ``.conv`` attribute, so LoRA has no effect until ``all_modules[0]``
points at the new ``.conv`` again. After ``merge_and_unload`` the same re-link restores the
stock module tree (identical state_dict keys).
"""

from __future__ import annotations

import torch
from peft.tuners.lora import Conv3d as LoraConv3d


def relink_conv_blocks(network: torch.nn.Module) -> None:
    for m in network.modules():
        seq = getattr(m, "all_modules", None)
        if isinstance(seq, torch.nn.Sequential) and hasattr(m, "conv") and len(seq) and seq[0] is not m.conv:
            seq[0] = m.conv


class MergedWeightConv3d(LoraConv3d):
    """peft's LoRA Conv3d, computed as ONE convolution with W + scale * B A.

    peft's branch runs two extra convolutions on the activations (k^3 conv to r channels, 1x1x1 back),
    in float32 under autocast; for 3D feature maps that costs several times the frozen conv itself.
    The merged weight is tiny to form, gradients reach A and B through it, and the result is
    mathematically identical (no LoRA dropout). peft's merge/save/load see an ordinary LoRA layer."""

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        # peft <= 0.21.2 sends a Conv3d whose kernel starts (1, 1, ...) down its conv2d-1x1 shortcut and fails there
        # (huggingface/peft#3768; ResEnc's 1x1x1 skip convs): such kernels take the general conv path here.
        base = self.get_base_layer()
        if base.weight.dim() != 5 or tuple(base.weight.shape[2:4]) != (1, 1) or base.groups != 1:
            return super().get_delta_weight(adapter)
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        dtype = a.dtype
        if a.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            a, b = a.float(), b.float()
        delta = self.conv_fn(a.transpose(0, 1), b).transpose(0, 1) * self.scaling[adapter]
        return delta.to(dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.base_layer
        if self.disable_adapters or self.merged or not self.active_adapters:
            return base(x)
        weight = base.weight
        for name in self.active_adapters:
            weight = weight + self.get_delta_weight(name).to(weight.dtype)
        return base._conv_forward(x, weight, base.bias)
