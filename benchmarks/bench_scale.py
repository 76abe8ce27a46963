"""Scale benchmark (on demand, not in CI): does the CPU scale learn, does its foundation help, where is the plateau.

Builds in --workdir (reusing what exists; every ``medseqft run`` resumes where it stopped):
1. the generated data, the pool planned and the foundation pre-trained at --scale; its reconstruction
   curve (the score nnU-Net logs per epoch) and pre-training minutes;
2. the plateau: ``medseqft run --method parallel`` (full fine-tuning of M0 on every task; M0 as the scale's
   ``--m0-transfer`` gives it, e.g. its encoder with a fresh decoder) at each
   --budgets epoch count (x the scale's iterations per epoch), on --fold;
3. the pre-training gain: the same parallel FFT from a random initialisation of the same network
   (nnU-Net's init, seeded), against FFT from M0, on the first --gain-tasks tasks, --gain-seeds seeds,
   at --gain-budget epochs.
Figures go to --figures (default: benchmarks/results/).

The LAST line printed is a JSON object:
  scale, fold, iterations_per_epoch
  foundation_curve        reconstruction score (1 - MSE/MSE0 on masked voxels) per pre-training epoch
  foundation_minutes      wall minutes of pre-training (nnU-Net's epoch timestamps)
  plateau                 {epochs: {"mean": mean task Dice, "tasks": {dataset: Dice}, "sites": {dataset: {site:
                          Dice}}, "train_seconds": {dataset: s}, "train_minutes": total}}
  parallel_mean_dice      mean task Dice of parallel FFT at the scale's default budget
  pretraining_gain_dice   mean over gain tasks and seeds of Dice(FFT from M0) - Dice(FFT from random init)
  pretraining_gain        per seed and task: {"from_m0", "from_random"}
  gain_budget_epochs, warmup_epochs, mirroring, m0_transfer   the fine-tuning recipe of every run

``python benchmarks/bench_scale.py --workdir W`` (about 1 h on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_mds import POOL_ID, build_foundation, random_init_foundation, set_env  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def mirroring_choice(choice: str | None, scale) -> tuple[bool | None, str]:
    """``--mirroring on|off`` as run_parallel's argument, and the run-name tag where it differs from the scale's."""
    mirroring = None if choice is None else choice == "on"
    return mirroring, (f"-mirror{choice.upper()}" if mirroring not in (None, scale.mirroring) else "")


def run_label(kind: str, fold: str, epochs: int, tag: str, seed: int) -> str:
    """A benchmark run's name, shared by the scripts that run the same run: the fold where it is not 0 (so a
    selection run and a report run never share a name), the budget, a tag for a non-default recipe, the seed."""
    return kind + (f"-f{fold}" if fold != "0" else "") + f"-e{epochs}{tag}-s{seed}"


def run_parallel(foundation: Path, name: str, tasks: list[str], epochs: int, scale, seed: int, fold: str,
                 warmup: int = 0, mirroring: bool | None = None, transfer: str = "full") -> dict:
    """One ``medseqft run --method parallel``; returns {dataset: Dice of M_t} and its training minutes.
    ``transfer``: its ``--m0-transfer`` (``full`` loads ``foundation`` as it is: the random init, the other arms)."""
    from nnunetv2_medseqft.paths import case_sites
    from nnunetv2_medseqft.reports.overlays import dice_per_site
    from nnunetv2_medseqft.reports.report import load_results
    from nnunetv2_medseqft.sequence.layout import run_folder

    cmd = [sys.executable, "-m", "nnunetv2_medseqft.cli.main", "run", "--foundation", str(foundation), "--datasets", *tasks,
           "--method", "parallel", "--name", name, "--seed", str(seed), "--fold", fold, "--device", "cpu",
           "--epochs", str(epochs), "--iterations", str(scale.iterations), "--val-iterations", str(scale.val_iterations)]
    if not (scale.mirroring if mirroring is None else mirroring):
        cmd.append("--no-mirroring")
    if warmup:
        cmd += ["--warmup-epochs", str(warmup)]
    if transfer != "full":
        cmd += ["--m0-transfer", transfer]
    print(f"== {name}", flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"{name} failed; re-run this benchmark to resume it.")
    results = load_results(run_folder(name))
    manifest = json.loads((Path(run_folder(name)) / "manifest.json").read_text())
    train_s = {k.split("/", 1)[1]: s.get("seconds") or 0 for k, s in manifest["steps"].items() if k.startswith("train/")}
    scores, names = results["scores"], results["tasks"]  # dataset names, in the order of ``tasks``
    return {"tasks": {d: scores[d]["M"]["mean"]["dice"] for d in names},
            "sites": {d: dice_per_site(scores[d]["M"], case_sites(d)) for d in names},
            "train_seconds": {d: round(v, 1) for d, v in train_s.items()},
            "train_minutes": round(sum(train_s.values()) / 60, 2)}


def foundation_curve(foundation: Path) -> tuple[list[float], float]:
    import torch

    log = torch.load(foundation, map_location="cpu", weights_only=False)["logging"]
    minutes = (log["epoch_end_timestamps"][-1] - log["epoch_start_timestamps"][0]) / 60
    return [round(float(v), 4) for v in log["mean_fg_dice"]], round(minutes, 2)


def plot(curve: list[float], plateau: dict, iterations: int, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(curve) + 1), curve, marker=".")
    ax.set(xlabel="pre-training epoch", ylabel="reconstruction score (1 - MSE/MSE0)", title="Foundation M0")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "foundation_curve.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    budgets = sorted(plateau, key=int)
    tasks = sorted({t for b in budgets for t in plateau[b]["tasks"]})
    x = [int(b) * iterations for b in budgets]
    for t in tasks:
        ax.plot(x, [plateau[b]["tasks"].get(t) for b in budgets], marker="o", label=t.split("_", 1)[-1])
    ax.plot(x, [plateau[b]["mean"] for b in budgets], marker="s", color="k", label="mean")
    ax.set(xlabel="training iterations per task", ylabel="validation Dice", title="Parallel FFT from M0")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "plateau_curve.png", dpi=100)
    plt.close(fig)
    return [str(out / "foundation_curve.png"), str(out / "plateau_curve.png")]


def main() -> None:
    from nnunetv2_medseqft.scales import SCALES, get_scale

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--scale", default="cpu", choices=list(SCALES))
    p.add_argument("--budgets", nargs="+", type=int, default=[16, 8, 4, 24], help="epochs per task, run in this order")
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--fold", default="0")
    p.add_argument("--gain-tasks", type=int, default=2)
    p.add_argument("--gain-seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--gain-budget", type=int, default=None, help="epochs (default: the scale's)")
    p.add_argument("--pretrain-trainer", default=None, help="another foundation budget than the scale's")
    p.add_argument("--warmup", type=int, default=0,
                   help="epochs of linear learning-rate warm-up in every fine-tuning (medseqft run --warmup-epochs)")
    p.add_argument("--mirroring", choices=("on", "off"), default=None,
                   help="nnU-Net's mirroring augmentation in every fine-tuning (default: the scale's; run names get "
                        "-mirrorON/-mirrorOFF where it differs)")
    p.add_argument("--m0-transfer", choices=("full", "encoder"), default=None,
                   help="what the runs from M0 receive (default: the scale's; run names get -encoder where not full)")
    p.add_argument("--figures", default=str(RESULTS))
    args = p.parse_args()
    scale = get_scale(args.scale)
    gain_budget = args.gain_budget or scale.epochs
    workdir = Path(args.workdir).resolve()
    set_env(workdir)
    started = time.time()
    mirroring, tag = mirroring_choice(args.mirroring, scale)
    w = (f"-w{args.warmup}" if args.warmup else "") + tag  # run names: a warm-up or other mirroring is another experiment
    transfer = args.m0_transfer or scale.m0_transfer
    wm = w + ("" if transfer == "full" else f"-{transfer}")  # ... and so is another start from M0 (not for scratch)

    f = build_foundation(workdir, scale, "cpu", pretrain_trainer=args.pretrain_trainer)
    curve, f_minutes = foundation_curve(f)
    tasks = [str(POOL_ID + 1 + i) for i in range(args.tasks)]
    plateau = {}
    for e in args.budgets:
        r = run_parallel(f, run_label("plateau", args.fold, e, wm, 0), tasks, e, scale, 0, args.fold, args.warmup,
                         mirroring, transfer)
        r["mean"] = statistics.mean(r["tasks"].values())
        plateau[str(e)] = r
    gain = {}
    for seed in args.gain_seeds:
        gain_tasks = tasks[:args.gain_tasks]
        if seed == 0 and str(gain_budget) in plateau:
            pre = plateau[str(gain_budget)]["tasks"]
        else:
            pre = run_parallel(f, run_label("pretrained", args.fold, gain_budget, wm, seed), gain_tasks, gain_budget,
                               scale, seed, args.fold, args.warmup, mirroring, transfer)["tasks"]
        scratch = run_parallel(random_init_foundation(f, seed), run_label("scratch", args.fold, gain_budget, w, seed),
                               gain_tasks, gain_budget, scale, seed, args.fold, args.warmup, mirroring)["tasks"]
        gain[str(seed)] = {d: {"from_m0": pre[d], "from_random": v} for d, v in scratch.items()}
    diffs = [v["from_m0"] - v["from_random"] for per in gain.values() for v in per.values()]
    figures = plot(curve, plateau, scale.iterations, Path(args.figures))

    print(f"\nfoundation: {len(curve)} epochs in {f_minutes} min, reconstruction score {curve[0]} -> {curve[-1]} "
          f"(best {max(curve)})")
    names = list(next(iter(plateau.values()))["tasks"]) if plateau else []
    print(f"\n| epochs x {scale.iterations} | " + " | ".join(names) + " | mean | train min |")
    print("|---" * (len(names) + 3) + "|")
    for e in sorted(plateau, key=int):
        r = plateau[e]
        print(f"| {e} | " + " | ".join(f"{r['tasks'][t]:.1f}" for t in names) + f" | {r['mean']:.1f} | "
              f"{r['train_minutes']} |")
    print("\npre-training gain (Dice from M0 - from random init):")
    for seed, per in gain.items():
        for d, v in per.items():
            print(f"  seed {seed} {d}: {v['from_m0']:.1f} - {v['from_random']:.1f} = {v['from_m0'] - v['from_random']:+.1f}")
    print(f"figures: {', '.join(figures)}; {(time.time() - started) / 60:.1f} min")
    default = plateau.get(str(scale.epochs))
    print(json.dumps({
        "scale": scale.name, "fold": args.fold, "iterations_per_epoch": scale.iterations,
        "foundation_curve": curve, "foundation_minutes": f_minutes, "plateau": plateau,
        "parallel_mean_dice": round(default["mean"], 2) if default else None,
        "pretraining_gain_dice": round(statistics.mean(diffs), 2) if diffs else None,
        "pretraining_gain": gain, "gain_budget_epochs": gain_budget, "warmup_epochs": args.warmup,
        "mirroring": scale.mirroring if mirroring is None else mirroring, "m0_transfer": transfer}))


if __name__ == "__main__":
    main()
