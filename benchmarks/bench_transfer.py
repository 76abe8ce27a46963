"""Transfer benchmark (on demand, not in CI): which foundation recipe makes full fine-tuning beat a random init.

Each ARM is a way to start parallel FFT (``medseqft run --method parallel``) on the first --tasks tasks:
  random          nnU-Net's own initialisation of the same network, seeded (the reference)
  full            the foundation M0 as stock ``-pretrained_weights`` loads it (all but the output head)
  encoder         M0's encoder, a freshly initialised decoder (seeded)
  ssl-R-B         a foundation pre-trained with SSL mask ratio R and block edge B voxels (the pool's plans with
                  a ``medseqft.ssl`` section, under the plans name ``<scale plans>_sslRbB``), loaded in full
  ssl-R-B-encoder the encoder of that foundation, a freshly initialised decoder
Every arm uses the same plans, budget, fold and seeds. Work lives in --workdir (a bench_scale.py workdir: its data
and foundation are reused); runs and foundations resume where they stopped.

The LAST line printed is a JSON object: {"fold", "epochs", "iterations_per_epoch", "seeds",
"dice": {arm: {seed: {dataset: Dice}}}, "gain": {arm: mean over tasks and seeds of Dice(arm) - Dice(random)},
"foundation_curves": {arm: reconstruction score per pre-training epoch}}.

``python benchmarks/bench_transfer.py --workdir W --arms random full encoder ssl-0.75-8 --tasks 1 --seeds 0``
Label-scarce protocol (5 labelled cases per fold, the data and foundation of W shared):
``python benchmarks/bench_transfer.py --workdir W5 --source W --labelled 5 --arms random encoder --fold 1``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_mds import BIN, POOL_ID, build_foundation, random_init_foundation, set_env, sh  # noqa: E402
from bench_scale import foundation_curve, mirroring_choice, run_label, run_parallel  # noqa: E402


def ssl_plans(workdir: Path, scale, mask_ratio: float, block_size: int) -> str:
    """The pool's plans with an SSL section, under a new plans name (same preprocessed data)."""
    folder = next((workdir / "nnUNet_preprocessed").glob(f"Dataset{POOL_ID}_*"))
    name = f"{scale.plans_name}_ssl{mask_ratio:g}b{block_size}"
    out = folder / f"{name}.json"
    if not out.is_file():
        plans = json.loads((folder / f"{scale.plans_name}.json").read_text())
        plans["plans_name"] = name
        plans["medseqft"] = {"ssl": {"mask_ratio": mask_ratio, "block_size": block_size}}
        out.write_text(json.dumps(plans, indent=2))
    return name


def ssl_foundation(workdir: Path, scale, mask_ratio: float, block_size: int) -> Path:
    plans = ssl_plans(workdir, scale, mask_ratio, block_size)
    res = workdir / "nnUNet_results"
    pattern = f"Dataset{POOL_ID}_*/{scale.pretrain_trainer}__{plans}__3d_fullres/fold_all/checkpoint_final.pth"
    if not any(res.glob(pattern)):
        sh([str(BIN / "nnUNetv2_train"), str(POOL_ID), "3d_fullres", "all", "-tr", scale.pretrain_trainer,
            "-p", plans, "-device", "cpu"])
    return next(res.glob(pattern))


def encoder_only(foundation: Path, seed: int) -> Path:
    """M0's encoder in a seeded random initialisation of the whole network (decoder and head fresh)."""
    from nnunetv2_medseqft.method.foundation import load_foundation, start_from_foundation

    out = foundation.parent / f"encoder_only_s{seed}.pth"
    if not out.is_file():
        start_from_foundation(load_foundation(str(foundation)), "encoder", seed, str(out))
    return out


def label_scarce_workdir(workdir: Path, source: Path, tasks: list[str], labelled: int, seed: int = 0) -> None:
    """``workdir`` as a view of ``source`` (data, plans and preprocessing shared through symlinks) in which every
    fold of each task trains on ``labelled`` of its training cases (a seeded subset, the same for every arm and
    seed); the validation cases are nnU-Net's. nnU-Net reads the split from ``splits_final.json``, MDS too."""
    import numpy as np

    raw = workdir / "nnUNet_raw"
    if not raw.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        raw.symlink_to(source / "nnUNet_raw")
    for task in tasks:
        name = next((source / "nnUNet_preprocessed").glob(f"Dataset{int(task):03d}_*")).name
        folder = workdir / "nnUNet_preprocessed" / name
        folder.mkdir(parents=True, exist_ok=True)
        for entry in (source / "nnUNet_preprocessed" / name).iterdir():
            if entry.name != "splits_final.json" and not (folder / entry.name).exists() and \
                    (entry.is_dir() or entry.name in ("dataset.json", "dataset_fingerprint.json", "plans.json") or
                     entry.name.startswith("MedSeqFTPlans-")):  # shared data and base plans, not other runs' files
                (folder / entry.name).symlink_to(entry)
        if not (folder / "splits_final.json").is_file():
            splits = json.loads((source / "nnUNet_preprocessed" / name / "splits_final.json").read_text())
            rng = np.random.default_rng(seed)
            for fold in splits:
                fold["train"] = sorted(rng.choice(sorted(fold["train"]), size=labelled, replace=False).tolist())
            (folder / "splits_final.json").write_text(json.dumps(splits, indent=1))
        print(f"{name}: {labelled} labelled training cases per fold, e.g. fold 0 "
              f"{json.loads((folder / 'splits_final.json').read_text())[0]['train']}", flush=True)


def main() -> None:
    from nnunetv2_medseqft.scales import SCALES, get_scale

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--scale", default="cpu", choices=list(SCALES))
    p.add_argument("--arms", nargs="+", default=["random", "full", "encoder"])
    p.add_argument("--tasks", type=int, default=2)
    p.add_argument("--fold", default="0")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--epochs", type=int, default=None, help="epochs per task (default: the scale's)")
    p.add_argument("--labelled", type=int, default=None,
                   help="label-scarce protocol: train every fold on this many of its training cases (needs --source)")
    p.add_argument("--source", default=None, help="with --labelled: the workdir whose data and foundation are used")
    p.add_argument("--mirroring", choices=("on", "off"), default=None,
                   help="nnU-Net's mirroring augmentation (default: the scale's; run names get -mirrorON/-mirrorOFF "
                        "where it differs)")
    args = p.parse_args()
    scale = get_scale(args.scale)
    epochs = args.epochs or scale.epochs
    workdir = Path(args.workdir).resolve()
    tasks = [str(POOL_ID + 1 + i) for i in range(args.tasks)]
    if args.labelled:
        if not args.source:
            raise SystemExit("--labelled needs --source W (a workdir with data, plans and a foundation)")
        label_scarce_workdir(workdir, Path(args.source).resolve(), tasks, args.labelled)
    set_env(workdir)
    m0 = build_foundation(Path(args.source).resolve() if args.labelled else workdir, scale, "cpu")
    dice, curves = {}, {}
    for arm in args.arms:
        dice[arm] = {}
        for seed in args.seeds:
            if arm == "random":
                start = random_init_foundation(m0, seed)
            elif arm == "full":
                start = m0
            elif arm == "encoder":
                start = encoder_only(m0, seed)
            elif arm.startswith("ssl-"):
                _, ratio, block, *part = arm.split("-")
                start = ssl_foundation(workdir, scale, float(ratio), int(block))
                curves[arm] = foundation_curve(start)[0]
                if part == ["encoder"]:
                    start = encoder_only(start, seed)
            else:
                raise SystemExit(f"unknown arm {arm!r}: random, full, encoder, ssl-RATIO-BLOCK[-encoder]")
            # the run names of bench_scale.py for the arms it also runs, so their runs are shared
            name = {"random": "scratch", "full": "pretrained"}.get(arm, arm.replace(".", "p"))  # no '.' in run names
            name = "plateau" if (arm == "full" and seed == 0) else name
            mirroring, tag = mirroring_choice(args.mirroring, scale)
            r = run_parallel(start, run_label(name, args.fold, epochs, tag, seed), tasks, epochs, scale, seed, args.fold,
                             mirroring=mirroring)
            dice[arm][str(seed)] = r["tasks"]
            print(f"{arm} seed {seed}: " + ", ".join(f"{d} {v:.1f}" for d, v in r["tasks"].items()), flush=True)
    gain = {}
    if "random" in dice:
        for arm in dice:
            diffs = [dice[arm][s][d] - dice["random"][s][d] for s in dice[arm] for d in dice[arm][s]
                     if d in dice["random"].get(s, {})]
            gain[arm] = round(statistics.mean(diffs), 2) if diffs else None
    print("\n| arm | " + " | ".join(f"seed {s}" for s in args.seeds) + " | gain vs random |")
    print("|---" * (len(args.seeds) + 2) + "|")
    for arm, per in dice.items():
        cells = [" ".join(f"{v:.1f}" for v in per[str(s)].values()) for s in args.seeds]
        print(f"| {arm} | " + " | ".join(cells) + f" | {gain.get(arm)} |")
    print(json.dumps({"fold": args.fold, "epochs": epochs, "iterations_per_epoch": scale.iterations,
                      "labelled_cases_per_fold": args.labelled,
                      "mirroring": scale.mirroring if args.mirroring is None else args.mirroring == "on",
                      "seeds": args.seeds, "tasks": tasks, "dice": dice, "gain": gain, "foundation_curves": curves}))


if __name__ == "__main__":
    main()
