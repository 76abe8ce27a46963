"""Ablation benchmark (on demand, not in CI): our readings of K&G RFT next to the full fine-tuning baselines.

Each ARM is ``medseqft run --method medseqft`` with ``--rft`` settings: a named reading (``READINGS``) or
``NAME:key=value,key=value``. Next to the arms run sequential FFT (``seqfft``) and parallel FFT from M0, on the same
tasks, budget, fold and seeds, every one started from M0 as the scale says (``--m0-transfer``; the parallel run is
bench_scale.py's run of the same name, shared). Work
lives in --workdir (a bench_scale.py workdir: its data and foundation are reused); every run resumes where it
stopped. Choose settings on one fold (default 0), report on another (--fold 1) without changing them.

Prints per arm: mean task Dice of the exported models M_t and of the stage-A models F_t, BWT, BWT of the encoder
alone, the paired per-seed differences against parallel FFT and seqFFT, and the compute (training iterations and
minutes per task). The LAST line printed is a JSON object: {"fold", "epochs", "iterations_per_epoch", "tasks",
"seeds", "arms": {arm: {"rft", "mean_dice", "f_mean_dice", "bwt", "bwt_encoder" (each {"mean", "sd", "per_seed"}),
"minus_parallel", "minus_seqfft" (per seed), "iterations_per_task", "train_minutes"}}, "baselines": {method: the
same fields}}.

``python benchmarks/bench_ablation.py --workdir W --arms default k-all --tasks 2 --seeds 0``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_mds import POOL_ID, build_foundation, set_env  # noqa: E402
from bench_scale import run_label, run_parallel  # noqa: E402

READINGS = {  # METHOD.md, "Readings still open": the default, and one reading changed at a time
    "default": {},
    "before-2026-12-03": {"student_init": "previous", "g_teacher": "previous", "g_layers": "all", "budget": "split",
                          "k_layers": "all"},
    "student-previous": {"student_init": "previous"},
    "split": {"budget": "split"},
    "g-previous": {"g_teacher": "previous"},
    "g-all": {"g_layers": "all"},
    "k-all": {"k_layers": "all"},  # the default until 2026-12-03 (ablation-k-encoder-2026-12-03.txt)
    "k-encoder": {"k_layers": "encoder"},
    "export-fft": {"export": "fft"},
    "adamw": {"stage_b_optimizer": "adamw"},
}


def parse_arm(text: str) -> tuple[str, dict]:
    from nnunetv2_medseqft.method.settings import RFTSettings
    from nnunetv2_medseqft.method.settings import key_value

    if ":" in text:
        name, _, pairs = text.partition(":")
        rft = dict(key_value(p) for p in pairs.split(",") if p)
    elif text in READINGS:
        name, rft = text, READINGS[text]
    else:
        raise SystemExit(f"unknown arm {text!r}: one of {', '.join(READINGS)}, or NAME:key=value,key=value")
    RFTSettings.from_dict(rft)  # a bad value fails here, before anything trains
    return name, rft


def run_method(m0: Path, name: str, method: str, rft: dict, tasks: list[str], args, scale, seed: int) -> None:
    cmd = [sys.executable, "-m", "nnunetv2_medseqft.cli.main", "run", "--foundation", str(m0), "--datasets", *tasks,
           "--method", method, "--name", name, "--seed", str(seed), "--fold", args.fold, "--device", "cpu",
           "--epochs", str(args.epochs), "--iterations", str(scale.iterations), "--val-iterations",
           str(scale.val_iterations), "--mds", f"repeats={args.mds_repeats}", *scale.recipe_args()]
    if rft:
        cmd += ["--rft", *(f"{k}={v}" for k, v in rft.items())]
    print(f"== {name}", flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"{name} failed; re-run this benchmark to resume it.")


def run_numbers(name: str, iterations: int) -> dict:
    """Per-run numbers from its results and manifest: mean Dice of M_t and F_t, BWT, compute per task."""
    import torch

    from nnunetv2_medseqft.reports.report import load_results
    from nnunetv2_medseqft.sequence.layout import run_folder

    folder = Path(run_folder(name))
    results = load_results(str(folder))
    scores = results["scores"]
    f_dice = [scores[d]["F"]["mean"]["dice"] for d in results["tasks"] if "F" in scores[d]]
    steps = json.loads((folder / "manifest.json").read_text())["steps"]
    train = {k: s for k, s in steps.items() if k.startswith("train/")}
    epochs = []
    for key in train:  # the trained epochs (stage A + B) from each task model's own log
        dataset = key.split("/", 1)[1]
        ckpt = next(Path(os.environ["nnUNet_results"]).glob(
            f"{dataset}/*__MedSeqFTPlans_{name}__*/fold_*/checkpoint_final.pth"), None)
        if ckpt is not None:
            epochs.append(len(torch.load(ckpt, map_location="cpu", weights_only=False)["logging"]["train_losses"]))
    return {"mean_dice": results["summary"]["mean_dice"], "bwt": results["summary"].get("bwt"),
            "bwt_encoder": results["summary"].get("bwt_encoder"),
            "f_mean_dice": statistics.mean(f_dice) if f_dice else None,
            "iterations_per_task": round(statistics.mean(epochs) * iterations) if epochs else None,
            "train_minutes": round(sum(s.get("seconds") or 0 for s in train.values()) / 60, 2)}


def _stats(per_seed: dict) -> dict:
    values = [v for v in per_seed.values() if v is not None]
    return {"mean": round(statistics.mean(values), 2) if values else None,
            "sd": round(statistics.stdev(values), 2) if len(values) > 1 else None,
            "per_seed": {s: None if v is None else round(v, 2) for s, v in per_seed.items()}}


def summarise(per_seed: dict, seeds: list[int], reference: dict) -> dict:
    """per_seed: {seed: run_numbers}; reference: {method: {seed: run_numbers}} for the paired differences."""
    out = {k: _stats({s: per_seed[s][k] for s in seeds}) for k in ("mean_dice", "f_mean_dice", "bwt", "bwt_encoder")}
    for method in ("parallel", "seqfft"):
        out[f"minus_{method}"] = {s: round(per_seed[s]["mean_dice"] - reference[method][s]["mean_dice"], 2)
                                  for s in seeds if method in reference}
    out["iterations_per_task"] = per_seed[seeds[0]]["iterations_per_task"]
    out["train_minutes"] = round(statistics.mean(per_seed[s]["train_minutes"] for s in seeds), 2)
    return out


def main() -> None:
    from nnunetv2_medseqft.scales import SCALES, get_scale

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--scale", default="cpu", choices=list(SCALES))
    p.add_argument("--arms", nargs="+", default=["default", "before-2026-12-03"])
    p.add_argument("--tasks", type=int, default=2)
    p.add_argument("--fold", default="0")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--epochs", type=int, default=None, help="epochs per task (default: the scale's)")
    p.add_argument("--mds-repeats", type=int, default=64)
    args = p.parse_args()
    scale = get_scale(args.scale)
    args.epochs = args.epochs or scale.epochs
    arms = dict(parse_arm(a) for a in args.arms)
    workdir = Path(args.workdir).resolve()
    set_env(workdir)
    m0 = build_foundation(workdir, scale, "cpu")
    tasks = [str(POOL_ID + 1 + i) for i in range(args.tasks)]
    iterations = scale.iterations
    reference: dict = {"parallel": {}, "seqfft": {}}
    transfer_tag = "" if scale.m0_transfer == "full" else f"-{scale.m0_transfer}"
    for seed in args.seeds:
        # parallel FFT from M0 as the scale starts every method (--m0-transfer): bench_scale.py's run of that name
        name = run_label("plateau" if seed == 0 else "pretrained", args.fold, args.epochs, transfer_tag, seed)
        run_parallel(m0, name, tasks, args.epochs, scale, seed, args.fold, transfer=scale.m0_transfer)
        reference["parallel"][seed] = run_numbers(name, iterations)
        name = run_label("abl-seqfft", args.fold, args.epochs, "", seed)
        run_method(m0, name, "seqfft", {}, tasks, args, scale, seed)
        reference["seqfft"][seed] = run_numbers(name, iterations)
    rows = {}
    for arm, rft in arms.items():
        per_seed = {}
        for seed in args.seeds:
            name = run_label(f"abl-{arm}", args.fold, args.epochs, "", seed)
            run_method(m0, name, "medseqft", rft, tasks, args, scale, seed)
            per_seed[seed] = run_numbers(name, iterations)
        rows[arm] = {"rft": rft, **summarise(per_seed, args.seeds, reference)}
    baselines = {m: summarise(reference[m], args.seeds, reference) for m in reference}

    def cell(stats):
        return "-" if stats["mean"] is None else f"{stats['mean']:.1f}" + (f" ± {stats['sd']:.1f}" if stats["sd"] else "")

    print(f"\nfold {args.fold}, {len(tasks)} tasks, {args.epochs} x {iterations} iterations, seeds {args.seeds}")
    print("| arm | --rft | Dice M_t | Dice F_t | BWT | BWT (encoder) | - parallel (per seed) | - seqFFT (per seed) "
          "| iterations/task | train min |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for arm, r in {**{f"({m})": {"rft": {}, **v} for m, v in baselines.items()}, **rows}.items():
        print(f"| {arm} | {' '.join(f'{k}={v}' for k, v in r['rft'].items()) or '-'} | {cell(r['mean_dice'])} | "
              f"{cell(r['f_mean_dice'])} | {cell(r['bwt'])} | {cell(r['bwt_encoder'])} | {r['minus_parallel']} | "
              f"{r['minus_seqfft']} | "
              f"{r['iterations_per_task']} | {r['train_minutes']} |")
    print(json.dumps({"fold": args.fold, "epochs": args.epochs, "iterations_per_epoch": iterations, "tasks": tasks,
                      "seeds": args.seeds, "arms": rows, "baselines": baselines}))


if __name__ == "__main__":
    main()
