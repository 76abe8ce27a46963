"""Threads benchmark (on demand, not in CI): on this machine, is one training with every core faster than one
training per core?

Times whole nnU-Net iterations (the trainer's own loader + train_step, stock nnUNetTrainer, task 1 of
--scale, data loader workers as nnUNet_n_proc_DA says) in two layouts, one after the other:
  shared   one process, torch threads = cores (what nnUNetv2_train does on a CPU)
  split    one process per core, each with one torch thread, all at once
Builds its data like the other benchmarks in --workdir (reusing what exists).

The LAST line printed is a JSON object:
  split_throughput_ratio   iterations/s of all split processes together / iterations/s of the shared one
  shared_iteration_s, split_iteration_s   median seconds per iteration in each layout (per process)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_mds import add_scale_args, build, set_env  # noqa: E402


def iterations(args, threads: int) -> list[float]:
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    task, foundation = build(args, Path(args.workdir))
    tr = get_trainer_from_args(task, "3d_fullres", 0, "nnUNetTrainer", args.plans_name, device=torch.device("cpu"))
    maybe_load_checkpoint(tr, False, False, str(foundation))
    tr.on_train_start()
    torch.set_num_threads(threads)
    tr.network.train()
    if args.barrier:  # split layout: every process starts timing when all are ready
        Path(args.barrier, str(os.getpid())).touch()
        while len(os.listdir(args.barrier)) < args.processes:
            time.sleep(0.05)
    times = []
    for i in range(args.iterations + 3):
        t0 = time.perf_counter()
        tr.train_step(next(tr.dataloader_train))
        if i >= 3:
            times.append(time.perf_counter() - t0)
    tr.on_train_end()
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    add_scale_args(p)
    p.add_argument("--task", type=int, default=1)
    p.add_argument("--plans-name", default="MedSeqFTPlans")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=("cpu",))
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)  # a child process
    p.add_argument("--barrier", default=None, help=argparse.SUPPRESS)
    p.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.workdir = str(Path(args.workdir).resolve())
    set_env(Path(args.workdir))
    if args.threads:
        print(json.dumps(iterations(args, args.threads)))
        return 0

    build(args, Path(args.workdir))  # before any timing
    cores = os.cpu_count() or 1
    child = [sys.executable, __file__, *(argv or sys.argv[1:])]
    shared = json.loads(subprocess.run(child + ["--threads", str(cores)], capture_output=True, text=True,
                                       check=True).stdout.strip().splitlines()[-1])
    barrier = tempfile.mkdtemp()
    procs = [subprocess.Popen(child + ["--threads", "1", "--barrier", barrier, "--processes", str(cores)],
                              stdout=subprocess.PIPE, text=True) for _ in range(cores)]
    split = [json.loads(pr.communicate()[0].strip().splitlines()[-1]) for pr in procs]
    shared_s = statistics.median(shared)
    split_s = statistics.median([t for times in split for t in times])
    result = {"split_throughput_ratio": round((cores / split_s) / (1 / shared_s), 3),
              "shared_iteration_s": round(shared_s, 4), "split_iteration_s": round(split_s, 4), "cores": cores}
    print(f"shared: 1 process x {cores} threads, {shared_s:.3f} s/iteration; split: {cores} processes x 1 thread, "
          f"{split_s:.3f} s/iteration each")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
