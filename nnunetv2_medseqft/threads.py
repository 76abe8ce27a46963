"""``MEDSEQFT_TORCH_THREADS=N``: torch's CPU threads in every MedSeqFT process (trainers and ``medseqft``).

``nnUNetv2_train`` takes every core on a CPU. On 2 cores, two single-threaded trainings at once do 1.35x the
iterations of one two-threaded training (benchmarks/results/threads-2026-12-01.txt), which is how the
benchmarks run independent trainings (``bench_fidelity.py --jobs 2``).
"""

from __future__ import annotations

import os

from nnunetv2_medseqft.errors import MedSeqFTError

THREADS_ENV = "MEDSEQFT_TORCH_THREADS"


def threads_env(jobs: int) -> dict:
    """The environment entry that gives each of ``jobs`` processes run at once its share of the cores."""
    return {THREADS_ENV: str(max(1, (os.cpu_count() or 1) // max(1, jobs)))}


def apply_torch_threads() -> None:
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return
    if not value.isdigit() or int(value) < 1:
        raise MedSeqFTError(f"{THREADS_ENV} must be a whole number >= 1, got {value!r}; unset it to let "
                            f"nnU-Net use every core.")
    import torch  # here: most medseqft subcommands never need it

    torch.set_num_threads(int(value))
