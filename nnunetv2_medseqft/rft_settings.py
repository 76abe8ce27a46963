"""Settings of a MedSeqFT task step (stage A: FFT, stage B: K&G RFT), read from the plans' ``medseqft.rft``."""

from __future__ import annotations

from dataclasses import dataclass

from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.settings_base import JsonSettings


@dataclass(frozen=True)
class RFTSettings(JsonSettings):
    """stage_b_fraction: share of the trainer's epochs spent in stage B (the rest is stage A, FFT).
    lora_rank / lora_alpha / lora_targets: peft LoRA on every stage convolution of encoder and decoder
        (the regex matches PlainConvUNet's ``...stages...conv``; transposed convs are not supported by peft).
    lambda_k: weight of knowledge retention (student vs F_t features on every sample of the batch).
    lambda_g: weight of generalization retention (student vs M_{t-1} features on buffer samples).
    buffer: 'mds' (lowest SSL loss under the foundation) or 'random' (the MDS ablation).
    buffer_share: expected share of buffer samples in a stage-B batch (buffer cases are over-sampled)."""

    stage_b_fraction: float = 0.3
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = r".*stages.*\.conv"
    lambda_k: float = 1.0
    lambda_g: float = 1.0
    buffer: str = "mds"
    buffer_share: float = 0.5

    def __post_init__(self):
        if not 0.0 <= self.stage_b_fraction <= 1.0:
            raise MedSeqFTError(f"stage_b_fraction must lie in [0, 1], got {self.stage_b_fraction}.")
        if self.lora_rank < 1:
            raise MedSeqFTError(f"lora_rank must be >= 1, got {self.lora_rank}.")
        if self.lambda_k < 0 or self.lambda_g < 0:
            raise MedSeqFTError(f"lambda_k and lambda_g must be >= 0 (got {self.lambda_k}, {self.lambda_g}): "
                                "they weigh distances that are minimised. Set 0 to switch a term off.")
        if self.buffer not in ("mds", "random"):
            raise MedSeqFTError(f"buffer must be 'mds' or 'random', got {self.buffer!r}.")
        if not 0.0 < self.buffer_share < 1.0:
            raise MedSeqFTError(f"buffer_share must lie in (0, 1), got {self.buffer_share}.")
