"""``MEDSEQFT_TORCH_THREADS=N``: torch's CPU threads in every MedSeqFT process (trainers and ``medseqft``).

``MEDSEQFT_TORCH_THREADS_FILE=PATH``: a file holding that number, re-read at every epoch start and before every
run step: ``run_lanes`` (``medseqft demo``) raises it when a lane finishes, so the lanes still running take over
the freed cores.

``nnUNetv2_train`` takes every core on a CPU. On 2 cores, two single-threaded trainings at once do 1.35x the
iterations of one two-threaded training (benchmarks/results/threads-2026-12-01.txt), which is how the
benchmarks run independent trainings (``bench_fidelity.py --jobs 2``).
"""

from __future__ import annotations

import os

from nnunetv2_medseqft.errors import MedSeqFTError

THREADS_ENV = "MEDSEQFT_TORCH_THREADS"
THREADS_FILE_ENV = "MEDSEQFT_TORCH_THREADS_FILE"


def threads_per_job(jobs: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, jobs))


def threads_env(jobs: int) -> dict:
    """The environment entry that gives each of ``jobs`` processes run at once its share of the cores."""
    return {THREADS_ENV: str(threads_per_job(jobs))}


def apply_torch_threads() -> None:
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return
    if not value.isdigit() or int(value) < 1:
        raise MedSeqFTError(f"{THREADS_ENV} must be a whole number >= 1, got {value!r}; unset it to let "
                            f"nnU-Net use every core.")
    import torch  # here: most medseqft subcommands never need it

    torch.set_num_threads(int(value))


def refresh_torch_threads() -> None:
    """Take the thread count of ``MEDSEQFT_TORCH_THREADS_FILE`` if there is one; a missing or unreadable file
    keeps the current count (the file is advice from the lane runner, not a setting)."""
    path = os.environ.get(THREADS_FILE_ENV)
    if not path:
        return
    try:
        with open(path) as f:
            value = int(f.read().strip())
    except (OSError, ValueError):
        return
    import torch

    if value >= 1 and value != torch.get_num_threads():
        torch.set_num_threads(value)


def write_threads_file(path: str, threads: int) -> None:
    """Atomically: a trainer reading it at that moment sees the old or the new number, never half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{max(1, threads)}\n")
    os.replace(tmp, path)
