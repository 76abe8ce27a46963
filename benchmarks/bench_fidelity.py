"""Fidelity benchmark (on demand, not in CI): every method over the same tasks, budget and seeds.

Builds in --workdir (reusing what exists; every ``medseqft run`` resumes where it stopped): generated
data, the pool planned and a foundation pre-trained at --scale (nnunetv2_medseqft/scales.py), then
``medseqft run`` for each method and seed over --tasks sequential tasks and the unseen tasks, plus
``scratch`` (parallel FFT from a random initialisation of the same network: what pre-training buys).
Prints the per-method table (mean ± sd over seeds), the compute of each method and the paired
differences per seed.

The LAST line printed is a JSON object:
  medseqft_minus_parallel_dice   mean over seeds of (MedSeqFT - parallel FFT) mean task Dice, points 0-100
  medseqft_minus_seqfft_dice     the same against sequential FFT
  mds_minus_random_dice          MedSeqFT with the MDS buffer - with a random buffer
  unseen_transfer_minus_m0_dice  MedSeqFT: unseen-task Dice from the final body - from M0
  per_seed                       each difference per seed
  pretraining_gain_dice          parallel FFT from M0 - from a random initialisation (mean task Dice)
  parallel_mean_dice             mean task Dice of parallel FFT
  methods                        per method: mean/sd of mean_dice, mean_hd95, acc, bwt, fwt, unseen_run, unseen_m0
  compute                        per method: training iterations and wall minutes per seed (mean over seeds)
  scale, budget                  what was run

Full protocol at the CPU scale: ``python benchmarks/bench_fidelity.py --workdir W`` (4 tasks + 2 unseen,
3 seeds, every method); ``--jobs 2`` runs two at a time with one torch thread each (wall minutes per method are
then those of a shared machine: compare them within one layout).
Smoke run: ``--scale tiny --seeds 0 --tasks 2 --unseen 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_mds import POOL_ID, add_scale_args, build_foundation, random_init_foundation, set_env  # noqa: E402

ALL_METHODS = ("medseqft", "seqfft", "parallel", "random-buffer", "lora", "multitask", "scratch")
DIFFERENCES = {"medseqft_minus_parallel_dice": ("medseqft", "parallel", "mean_dice"),
               "medseqft_minus_seqfft_dice": ("medseqft", "seqfft", "mean_dice"),
               "mds_minus_random_dice": ("medseqft", "random-buffer", "mean_dice"),
               "pretraining_gain_dice": ("parallel", "scratch", "mean_dice")}


def run_method(args, f: Path, method: str, seed: int) -> str:
    from nnunetv2_medseqft.scales import get_scale
    from nnunetv2_medseqft.threads import THREADS_ENV

    name = f"fidelity-{method}-s{seed}-f{args.fold}"
    tasks = [str(POOL_ID + 1 + i) for i in range(args.tasks)]
    unseen = [str(POOL_ID + 5 + i) for i in range(args.unseen)]
    if method == "scratch":  # parallel FFT from a random initialisation: no unseen tasks (nothing to transfer)
        f, method, unseen = random_init_foundation(f, seed), "parallel", []
    cmd = [sys.executable, "-m", "nnunetv2_medseqft.cli.main", "run", "--foundation", str(f), "--datasets", *tasks,
           "--method", method, "--name", name, "--seed", str(seed), "--fold", args.fold, "--device", args.device,
           "--epochs", str(args.epochs), "--iterations", str(args.iterations), "--val-iterations",
           str(args.val_iterations), "--mds", f"repeats={args.mds_repeats}", *get_scale(args.scale).recipe_args()]
    if unseen:
        cmd += ["--unseen", *unseen]
    started = time.time()
    if args.jobs == 1:
        print(f"== {name}", flush=True)
        proc = subprocess.run(cmd)
    else:  # runs side by side: each with its share of the cores, its console output in a file
        log = Path(args.workdir) / "fidelity_logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        print(f"== {name} (output: {log})", flush=True)
        env = {**os.environ, THREADS_ENV: str(max(1, (os.cpu_count() or 1) // args.jobs))}
        with open(log, "a") as out:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed; re-run this benchmark to resume it.")
    print(f"   {name}: {(time.time() - started) / 60:.1f} min", flush=True)
    return name


def differences(rows: dict) -> tuple[dict, dict]:
    """Paired per-seed differences (a seed's runs share data, split and foundation), and their means."""
    per_seed, means = {}, {}

    def paired(a, b, metric):
        pa, pb = rows.get(a, {}).get(metric, {}).get("per_seed", {}), rows.get(b, {}).get(metric, {}).get("per_seed", {})
        return {s: pa[s] - pb[s] for s in pa if s in pb and pa[s] is not None and pb[s] is not None}

    for key, (a, b, metric) in DIFFERENCES.items():
        per_seed[key] = paired(a, b, metric)
    per_seed["unseen_transfer_minus_m0_dice"] = {
        s: v for s, v in rows.get("medseqft", {}).get("unseen_gain", {}).get("per_seed", {}).items() if v is not None}
    for key, values in per_seed.items():
        means[key] = round(sum(values.values()) / len(values), 2) if values else None
    return per_seed, means


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    add_scale_args(p)
    p.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--tasks", type=int, default=4, help="sequential tasks (1-4)")
    p.add_argument("--unseen", type=int, default=2, help="unseen tasks (0-2)")
    p.add_argument("--fold", default="0")
    p.add_argument("--epochs", type=int, default=None, help="per task (default: the scale's)")
    p.add_argument("--iterations", type=int, default=None, help="per epoch (default: the scale's)")
    p.add_argument("--val-iterations", type=int, default=None, help="per epoch (default: the scale's)")
    p.add_argument("--mds-repeats", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once, each with cores/jobs torch threads (2 on 2 cores: 1.35x the iterations)")
    args = p.parse_args()

    from nnunetv2_medseqft.scales import get_scale

    scale = get_scale(args.scale)
    args.epochs = args.epochs or scale.epochs
    args.iterations = args.iterations or scale.iterations
    args.val_iterations = args.val_iterations or scale.val_iterations
    workdir = Path(args.workdir).resolve()
    set_env(workdir)
    from nnunetv2_medseqft.reports.report import compare_rows, load_results, markdown_table, write_report
    from nnunetv2_medseqft.sequence.layout import run_folder

    started = time.time()
    f = build_foundation(workdir, scale, args.device, pretrain_trainer=args.pretrain_trainer)
    todo = [(m, s) for s in args.seeds for m in args.methods]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # in order: a seed's methods finish before the next seed
        names = list(pool.map(lambda ms: run_method(args, f, *ms), todo))
    folders = [run_folder(n) for n in names]
    rows = compare_rows([load_results(d) for d in folders])
    report = write_report(folders, out=str(workdir / "fidelity_report"))
    per_seed, means = differences(rows)
    compute = {m: _compute(rn, args.iterations * args.epochs) for m, rn in _by_method(names).items()}
    budget = {"pretrain_trainer": args.pretrain_trainer or scale.pretrain_trainer, "tasks": args.tasks, "fold": args.fold,
              "unseen": args.unseen, "seeds": args.seeds, "epochs": args.epochs, "iterations": args.iterations,
              "mds_repeats": args.mds_repeats, "device": args.device, "jobs": args.jobs, "machine": platform.processor() or
              platform.machine(), "hours": round((time.time() - started) / 3600, 2)}
    print()
    print(markdown_table(rows))
    print()
    print("compute per seed (mean over seeds): " + "; ".join(
        f"{m} {c['iterations']} iterations, {c['train_minutes']} train min, {c['wall_minutes']} wall min"
        for m, c in compute.items()))
    for key, values in per_seed.items():
        print(f"{key}: mean {means[key]} per seed {({s: round(v, 2) for s, v in values.items()})}")
    print(f"report: {report}")
    methods = {m: {k: {"mean": v["mean"], "sd": v["sd"]} for k, v in metrics.items()} for m, metrics in rows.items()}
    parallel = rows.get("parallel", {}).get("mean_dice", {}).get("mean")
    print(json.dumps({**means, "parallel_mean_dice": parallel, "per_seed": per_seed, "methods": methods,
                      "compute": compute, "scale": scale.name, "budget": budget}))


def _by_method(names: list[str]) -> dict:
    out: dict = {}
    for n in names:
        out.setdefault(n[len("fidelity-"):].rsplit("-s", 1)[0], []).append(n)
    return out


def _compute(run_names: list[str], iterations_per_training: int) -> dict:
    """Per seed: training iterations (stage A + B: MedSeqFT takes both out of one budget; a shared M0 reference
    counts for the run that trained it) and minutes, from the run's manifest (train steps, and all steps)."""
    from nnunetv2_medseqft.sequence.layout import run_folder

    per = []
    for n in run_names:
        steps = json.loads((Path(run_folder(n)) / "manifest.json").read_text())["steps"]
        train = [s for k, s in steps.items()
                 if k.startswith("train/") or (k.startswith("unseen/") and not k.endswith("/evaluate"))]
        per.append((len(train) * iterations_per_training, sum(s.get("seconds") or 0 for s in train) / 60,
                    sum(s.get("seconds") or 0 for s in steps.values()) / 60))
    mean = [round(sum(v) / len(v), 1) for v in zip(*per)]
    return {"iterations": int(mean[0]), "train_minutes": mean[1], "wall_minutes": mean[2]}


if __name__ == "__main__":
    main()
