"""CPU memory benchmark (on demand, not in CI): a CPU training with glibc keeping freed memory, against without.

Trains the same short full fine-tuning (``MedSeqFTFFTTrainer``, ``--epochs`` x 50 iterations, 5 validation
iterations) with ``MEDSEQFT_KEEP_FREED_MEMORY=0`` and ``=1`` (``nnunetv2_medseqft/cpu_memory.py``), alternating
in rounds, each a fresh ``nnUNetv2_train`` process, and reads each process' kernel time, minor page faults and peak
memory from the operating system. The trainings go to a temporary nnUNet_results; the only file written in the
workdir is a plans copy per training (removed at the end). A ``medseqft demo`` folder is a workdir:
  python benchmarks/bench_cpu_memory.py --workdir DEMO --plans MedSeqFTPlans-<sha8> \\
      --start DEMO/nnUNet_results/medseqft_runs/demo-medseqft/start_models/m0_encoder_s0.pth --threads 2

The LAST line printed is a JSON object:
  keep_freed_memory_epoch_ratio   median epoch seconds (epochs after the first) kept / default
  per arm: epoch_s, sys_s, minor_faults, max_rss_mb (medians over rounds)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_mds import set_env  # noqa: E402

ARMS = {"default": "0", "keep": "1"}


def train_once(args, arm: str, name: str, results: str) -> dict:
    from nnunetv2_medseqft.sequence.train_process import _command, child_env

    env = {**child_env(), "nnUNet_results": results, "MEDSEQFT_KEEP_FREED_MEMORY": ARMS[arm],
           "MEDSEQFT_TORCH_THREADS": str(args.threads)}
    cmd = ["nnUNetv2_train", args.dataset, "3d_fullres", args.fold, "-tr", "MedSeqFTFFTTrainer", "-p", name,
           "-device", "cpu", "-pretrained_weights", args.start]
    proc = subprocess.Popen(_command(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # the child's own resource use (and its waited loader workers')
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    epochs = [float(s) for s in re.findall(r"Epoch time: ([\d.]+) s", out)][1:]  # the first warms up
    return {"epoch_s": statistics.median(epochs), "sys_s": usage.ru_stime, "minor_faults": usage.ru_minflt,
            "max_rss_mb": usage.ru_maxrss / 1024}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="nnU-Net root with the planned task (e.g. a demo folder)")
    p.add_argument("--dataset", default="Dataset501_MSFTLiver")
    p.add_argument("--plans", required=True, help="the task's plans (a copy with the budget is trained)")
    p.add_argument("--start", required=True, help="start checkpoint for -pretrained_weights")
    p.add_argument("--fold", default="0")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    work = Path(args.workdir).resolve()
    set_env(work)  # nnU-Net's variables for the workdir; each training's nnUNet_results is a temporary folder
    folder = work / "nnUNet_preprocessed" / args.dataset
    plans = json.loads((folder / f"{args.plans}.json").read_text())
    plans.setdefault("medseqft", {})["budget"] = {"num_epochs": args.epochs, "iterations": 50, "val_iterations": 5,
                                                  "mirroring": 0}
    results, written, runs = tempfile.mkdtemp(prefix="bench_cpu_memory_"), [], {arm: [] for arm in ARMS}
    try:
        for r in range(args.rounds):
            for arm in ARMS:
                name = plans["plans_name"] = f"BenchCPUMemory_{arm}{r}"
                written.append(folder / f"{name}.json")
                written[-1].write_text(json.dumps(plans))
                runs[arm].append(train_once(args, arm, name, results))
                print(arm, r, json.dumps({k: round(v, 3) for k, v in runs[arm][-1].items()}), flush=True)
    finally:
        for f in written:
            f.unlink(missing_ok=True)
        shutil.rmtree(results, ignore_errors=True)
    med = {arm: {k: round(statistics.median(run[k] for run in rs), 3) for k in rs[0]} for arm, rs in runs.items()}
    ratio = med["keep"]["epoch_s"] / med["default"]["epoch_s"]
    print(f"{args.dataset} {args.plans}, {args.threads} torch thread(s), {args.epochs} epochs x 50 iterations, "
          f"{args.rounds} rounds; {platform.machine()}, {os.cpu_count()} cores")
    d, k = med["default"], med["keep"]
    print(f"epoch: {d['epoch_s']:.2f} s -> {k['epoch_s']:.2f} s ({ratio:.3f}x); kernel time {d['sys_s']:.1f} -> "
          f"{k['sys_s']:.1f} s; minor faults {d['minor_faults']:.0f} -> {k['minor_faults']:.0f}; peak RSS "
          f"{d['max_rss_mb']:.0f} -> {k['max_rss_mb']:.0f} MB")
    print(json.dumps({"keep_freed_memory_epoch_ratio": round(ratio, 3), **med, "threads": args.threads}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
