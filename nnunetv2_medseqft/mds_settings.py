"""Settings of MDS (Maximum Data Similarity) buffer selection, recorded in plans and buffer files."""

from __future__ import annotations

from dataclasses import dataclass

from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.settings_base import JsonSettings


@dataclass(frozen=True)
class MDSSettings(JsonSettings):
    """k: buffer size (absolute); when None, k = max(min_k, round(k_frac * training cases)).
    repeats: fixed number of SSL-loss draws per case (1000 = the paper's protocol); None = adaptive:
        draw in batches of ``draws_per_batch`` (at least ``min_repeats``) until the top-k set is settled
        at ``confidence``, or ``max_repeats`` draws. ``tolerance`` is the indifference zone: a case whose
        mean is known to within tolerance * boundary counts as settled even where it straddles the boundary
        (near-ties are interchangeable; without it they would run to max_repeats).
    seed: makes patches and masks, hence scores and buffer, reproducible."""

    k: int | None = None
    k_frac: float = 0.2
    min_k: int = 2
    repeats: int | None = None
    min_repeats: int = 16
    max_repeats: int = 1000
    draws_per_batch: int = 8
    confidence: float = 0.99
    tolerance: float = 0.02
    seed: int = 0

    def __post_init__(self):
        if self.k is not None and self.k < 1:
            raise MedSeqFTError(f"MDS k must be >= 1, got {self.k}.")
        if not 0.0 < self.k_frac <= 1.0:
            raise MedSeqFTError(f"MDS k_frac must lie in (0, 1], got {self.k_frac}.")
        if self.repeats is not None and self.repeats < 1:
            raise MedSeqFTError(f"MDS repeats must be >= 1, got {self.repeats}.")
        if not 1 <= self.min_repeats <= self.max_repeats:
            raise MedSeqFTError(f"MDS needs 1 <= min_repeats <= max_repeats, got {self.min_repeats}, {self.max_repeats}.")
        if self.draws_per_batch < 1:
            raise MedSeqFTError(f"MDS draws_per_batch must be >= 1, got {self.draws_per_batch}.")
        if not 0.0 <= self.tolerance < 1.0:
            raise MedSeqFTError(f"MDS tolerance must lie in [0, 1), got {self.tolerance}.")
        if not 0.5 < self.confidence < 1.0:
            raise MedSeqFTError(f"MDS confidence must lie in (0.5, 1), got {self.confidence}.")

    def buffer_size(self, n_training_cases: int) -> int:
        """K for a fold. A K above the number of training cases is an error, not a silent clamp."""
        k = self.k if self.k is not None else max(self.min_k, round(self.k_frac * n_training_cases))
        if k > n_training_cases:
            raise MedSeqFTError(f"MDS buffer size k={k} exceeds the fold's {n_training_cases} training cases. "
                                f"Use a smaller --k (or --k-frac).")
        return k

