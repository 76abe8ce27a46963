"""bfloat16 mixed precision for the MedSeqFT trainers on a CPU that computes bf16 in hardware.

nnU-Net trains in mixed precision on CUDA (fp16 autocast, grad scaler) and in float32 on a CPU. On a CPU with AMX or
AVX512-BF16 (Intel Xeon since Sapphire Rapids, AMD since Zen 4), oneDNN runs bf16 3D convolutions much faster than
float32 (``benchmarks/bench_cpu_bf16.py``). There the MedSeqFT trainers (fine-tuning and pre-training) run
their training and validation steps under ``torch.autocast("cpu", dtype=torch.bfloat16)``: convolutions in bf16;
weights, gradients and optimizer state in float32; the segmentation loss gets float32 logits (``FloatLogits``), the
distillation distance and the masked reconstruction error are computed in float32 (``method/distill.py``,
``method/ssl.py``). bf16 has float32's exponent range, so no grad scaler. Scoring (``evaluation/``), MDS and the
foundation's final SSL validation stay float32. Where the CPU lacks these instructions bf16 would be emulated and
slower, so it stays off.
``MEDSEQFT_CPU_BF16``: ``auto`` (default), ``0`` (off), ``1`` (on whatever the CPU).
"""

from __future__ import annotations

import contextlib
import os

import torch

from nnunetv2_medseqft.errors import MedSeqFTError

ENV = "MEDSEQFT_CPU_BF16"
# the training log's line when a trainer steps in bf16 (the tests look for it)
LOG_LINE = (f"Training and validation steps in bf16 mixed precision on this CPU (AMX / AVX512-BF16); {ENV}=0 trains "
            "in float32.")


def cpu_has_bf16() -> bool:
    """AMX tiles or AVX512-BF16 (PyTorch's own probes; private API, so absent means no)."""
    probes = (getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None))
    return any(bool(p()) for p in probes if p is not None)


def cpu_bf16(device: torch.device) -> bool:
    """Whether a training on ``device`` runs its steps in bf16 mixed precision."""
    if device.type != "cpu":
        return False
    value = os.environ.get(ENV, "auto").strip().lower()
    if value not in ("auto", "0", "1"):
        raise MedSeqFTError(f"{ENV}={value!r}: use auto (bf16 where the CPU computes it), 0 (float32) or 1 (bf16).")
    return value == "1" or (value == "auto" and cpu_has_bf16())


def check_cpu_bf16_setting() -> None:
    """Refuse a bad ``MEDSEQFT_CPU_BF16`` (commands that start trainings call this first)."""
    cpu_bf16(torch.device("cpu"))


def cpu_autocast(enabled: bool):
    """bf16 autocast for a training or validation step on a CPU (``enabled``: ``cpu_bf16``); otherwise nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


class FloatLogits(torch.nn.Module):
    """A segmentation loss on float32 logits (every deep-supervision output): Dice sums over a patch in float32."""

    def __init__(self, loss: torch.nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, output, target):
        output = [o.float() for o in output] if isinstance(output, (list, tuple)) else output.float()
        return self.loss(output, target)
