"""MDS benchmark (on demand, not in CI): adaptive vs fixed-R scoring, scoring overhead, site precision.

Builds everything in --workdir (default: a temporary folder), reusing steps whose outputs exist:
generated data (``synth``), the pool planned and preprocessed, a foundation pre-trained with
``--pretrain-trainer``, one task planned with ``medseqft plan``; then scores the task's fold twice,
adaptive (max_repeats = R) and fixed (repeats = R, R = --fixed-repeats, the paper's 1000 by default).

The LAST line printed is a JSON object with exactly these keys:
  forward_fraction       SSL draws (per-sample forwards) of adaptive / fixed R
  topk_jaccard           Jaccard index of the adaptive and fixed-R buffers
  throughput_ratio       scoring draws/s (case loading, patches, masks, forward, loss) / raw batched forward
                         draws/s of the same network, patch and batch size, timed in alternating blocks
  site_precision         fraction of the adaptive buffer from pool sites
  random_site_precision  expectation for a random buffer: fraction of the fold's training cases from pool sites
  paired_variance_ratio  median over neighbouring cases (by mean loss) of var(loss_a - loss_b) on common draws /
                         (var(loss_a) + var(loss_b)) on independent draws (--pair-draws each): what common draws buy

CPU scale (default): ``python benchmarks/bench_mds.py``; unit-test scale: ``--scale tiny --fixed-repeats 50``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
POOL_ID = 500


def sh(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def set_env(workdir: Path) -> None:
    """nnU-Net reads these at call time; subprocesses inherit them."""
    from nnunetv2_medseqft.plugin.discovery import shim_dir

    os.environ.update(
        nnUNet_raw=str(workdir / "nnUNet_raw"), nnUNet_preprocessed=str(workdir / "nnUNet_preprocessed"),
        nnUNet_results=str(workdir / "nnUNet_results"), nnUNet_def_n_proc=os.environ.get("nnUNet_def_n_proc", "2"),
        nnUNet_n_proc_DA=os.environ.get("nnUNet_n_proc_DA", "2"), nnUNet_compile="f", nnUNet_extTrainer=shim_dir(),
        PYTHONUNBUFFERED="1")


def build_foundation(workdir: Path, scale, device: str, seed: int = 0, pretrain_trainer: str | None = None,
                     first_id: int = POOL_ID) -> Path:
    """Generated data, the pool planned at ``scale`` and a pre-trained foundation (each step skipped when its
    output exists). ``scale``: a ``nnunetv2_medseqft.scales.Scale`` or its name; ``first_id``: the pool's id
    (two scales can share one nnU-Net root at different ids)."""
    from nnunetv2_medseqft.scales import get_scale
    from nnunetv2_medseqft.synth import generate, stale_datasets

    scale = get_scale(scale) if isinstance(scale, str) else scale
    trainer = pretrain_trainer or scale.pretrain_trainer
    raw, pre, res = (workdir / d for d in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))
    if not any(raw.glob(f"Dataset{first_id}_*")):
        generate(raw, preset=scale.preset, seed=seed, first_id=first_id)
    stale = stale_datasets(raw, first_id)
    if stale:
        raise SystemExit(f"{raw} holds generated data with other labels than today's ({', '.join(stale)}): use a new "
                         "--workdir (its runs would mix two benchmarks); the old one stays as it is.")
    if not any(pre.glob(f"Dataset{first_id}_*/{scale.plans_name}_3d_fullres")):
        sh(scale.plan_pool_command(first_id))
    pattern = f"Dataset{first_id}_*/{trainer}__{scale.plans_name}__3d_fullres/fold_all/checkpoint_final.pth"
    if not any(res.glob(pattern)):
        sh([str(BIN / "nnUNetv2_train"), str(first_id), "3d_fullres", "all", "-tr", trainer, "-p", scale.plans_name,
            "-device", device])
    return next(res.glob(pattern))


def random_init_foundation(foundation: Path, seed: int = 0) -> Path:
    """The foundation's checkpoint with freshly initialised weights (nnU-Net's own init, seeded) next to it:
    ``medseqft run --method parallel`` from it is training from scratch on identical plans and budget."""
    from nnunetv2_medseqft.method.foundation import load_foundation, start_from_foundation

    out = foundation.parent / f"random_init_s{seed}.pth"
    if not out.is_file():
        start_from_foundation(load_foundation(str(foundation)), "random", seed, str(out))
    return out


def add_scale_args(p: argparse.ArgumentParser) -> None:
    from nnunetv2_medseqft.scales import SCALES

    p.add_argument("--scale", default="cpu", choices=list(SCALES),
                   help="data, plans and foundation budget (nnunetv2_medseqft/scales.py; default: cpu)")
    p.add_argument("--pretrain-trainer", default=None, help="another foundation budget than the scale's")
    p.add_argument("--first-id", type=int, default=POOL_ID, help=f"the pool's dataset id (default: {POOL_ID})")


def build(args, workdir: Path) -> tuple[str, Path]:
    """The foundation and one planned task (each step skipped when its output exists)."""
    foundation = build_foundation(workdir, args.scale, args.device, args.seed, args.pretrain_trainer, args.first_id)
    raw, pre = workdir / "nnUNet_raw", workdir / "nnUNet_preprocessed"
    task_id = args.first_id + args.task
    task = next(raw.glob(f"Dataset{task_id:03d}_*")).name
    plans = pre / task / f"{args.plans_name}.json"
    recorded = json.loads(plans.read_text()).get("medseqft", {}).get("foundation", {}) if plans.is_file() else {}
    if recorded.get("path") != str(foundation.resolve()) or not (pre / task / f"{args.plans_name}_3d_fullres").is_dir():
        sh([sys.executable, "-m", "nnunetv2_medseqft.cli.main", "plan", "-d", str(task_id), "--foundation", str(foundation),
            "--plans-name", args.plans_name])
    return task, foundation


def throughput(task: str, fold, plans_name: str, settings, device: str, rounds: int) -> tuple[float, float]:
    """(scoring draws/s, raw forward draws/s), measured in alternating blocks so that the load of a shared
    machine hits both alike. Scoring = the real path on 2 cases (load, patches, masks, forward, loss); raw =
    batched forwards of the same network on masked random patches of the same size, nothing else."""
    import dataclasses

    import torch

    from nnunetv2_medseqft.method.buffer import prepare
    from nnunetv2_medseqft.method.mds import SSLScorer, score
    from nnunetv2_medseqft.method.ssl import block_mask, mask_input

    dpb = settings.draws_per_batch
    inputs = prepare(task, fold, plans_name, settings=dataclasses.replace(settings, repeats=2 * dpb),
                     log=lambda *_: None)
    inputs = dataclasses.replace(inputs, cases=inputs.cases[:2], k=1)
    scorer = SSLScorer(inputs.foundation, device)
    x = torch.randn((dpb, inputs.foundation.num_input_channels, *inputs.key["patch_size"]), device=scorer.device)
    x = mask_input(x, block_mask(x.shape, scorer.ssl_settings, device=scorer.device))
    autocast = torch.autocast("cuda") if scorer.device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def raw_block() -> None:
        for _ in range(4):  # as many forwards as one scoring block (2 cases x 2 batches)
            with torch.inference_mode(), autocast:
                scorer.network(x)
        if scorer.device.type == "cuda":
            torch.cuda.synchronize()

    def score_block() -> None:
        score(inputs, progress=False, scorer=scorer)
        if scorer.device.type == "cuda":
            torch.cuda.synchronize()

    raw_block(), score_block()  # warm-up
    t_raw = t_score = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        raw_block()
        t1 = time.perf_counter()
        score_block()
        t_raw, t_score = t_raw + t1 - t0, t_score + time.perf_counter() - t1
    draws = rounds * 4 * dpb
    return draws / t_score, draws / t_raw


def paired_variance_ratio(task: str, fold, plans_name: str, settings, device: str, draws: int) -> float:
    """The noise of a difference of two cases' losses on common draws (MDS's) against independent draws (each
    case its own stream, as if every case had its own seed), for neighbours in the ranking, where MDS decides."""
    import numpy as np
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from tqdm import tqdm
    from nnunetv2_medseqft.method.buffer import prepare
    from nnunetv2_medseqft.method.mds import CaseScores, CommonDraws, SSLScorer, _Engine

    inputs = prepare(task, fold, plans_name, settings=settings, log=lambda *_: None)
    scorer = SSLScorer(inputs.foundation, device)
    patch = tuple(inputs.key["patch_size"])
    dataset = infer_dataset_class(inputs.data_folder)(inputs.data_folder, identifiers=list(inputs.cases))

    def losses(key: str, stream: CommonDraws) -> np.ndarray:  # MDS's own drawing, from the given stream
        case = CaseScores(key)
        _Engine(scorer, dataset, patch, settings.draws_per_batch, stream, tqdm(disable=True)).draw(case, draws)
        return np.asarray(case.losses, dtype=np.float64)

    common = CommonDraws(settings.seed, patch, scorer.ssl_settings)
    paired = {k: losses(k, common) for k in inputs.cases}
    own = {k: losses(k, CommonDraws(10_000 + i, patch, scorer.ssl_settings)) for i, k in enumerate(inputs.cases)}
    ranked = sorted(inputs.cases, key=lambda k: paired[k].mean())
    ratios = [np.var(paired[a] - paired[b], ddof=1) / (np.var(own[a], ddof=1) + np.var(own[b], ddof=1))
              for a, b in zip(ranked[:-1], ranked[1:])]
    return float(np.median(ratios))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None, help="folder for data and models (default: a temporary folder)")
    add_scale_args(p)
    p.add_argument("--task", type=int, default=1, help="which sequential task to score, 1-4 (default: 1)")
    p.add_argument("--fold", default="0")
    p.add_argument("--plans-name", default="MedSeqFTPlans")
    p.add_argument("--fixed-repeats", type=int, default=1000, help="R of the fixed reference (default: 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--pair-draws", type=int, default=48,
                   help="draws per case for paired_variance_ratio (default: 48)")
    p.add_argument("--throughput-rounds", type=int, default=5,
                   help="alternating scoring/raw-forward blocks timed for throughput_ratio (default: 5)")
    args = p.parse_args(argv)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_mds_")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    set_env(workdir)
    from nnunetv2_medseqft.method.buffer import select_buffer
    from nnunetv2_medseqft.method.settings import MDSSettings
    from nnunetv2_medseqft.paths import case_sites

    task, foundation = build(args, workdir)
    base = MDSSettings(seed=args.seed)
    adaptive_settings = MDSSettings(seed=args.seed, max_repeats=args.fixed_repeats,
                                    min_repeats=min(base.min_repeats, args.fixed_repeats))
    adaptive = select_buffer(task, args.fold, args.plans_name, settings=adaptive_settings, device=args.device)
    fixed = select_buffer(task, args.fold, args.plans_name, settings=MDSSettings(seed=args.seed,
                          repeats=args.fixed_repeats), device=args.device)
    scoring_rate, raw_rate = throughput(task, args.fold, args.plans_name, base, args.device, args.throughput_rounds)
    variance_ratio = paired_variance_ratio(task, args.fold, args.plans_name, base, args.device, args.pair_draws)

    sites_json = json.loads((workdir / "nnUNet_raw" / task / "sites.json").read_text())
    pool_sites, sites = set(sites_json["pool_sites"]), case_sites(task)
    a, f = set(adaptive["buffer"]), set(fixed["buffer"])
    result = {
        "forward_fraction": adaptive["draws"] / fixed["draws"],
        "topk_jaccard": len(a & f) / len(a | f),
        "throughput_ratio": scoring_rate / raw_rate,
        "site_precision": sum(sites[c] in pool_sites for c in adaptive["buffer"]) / len(adaptive["buffer"]),
        "random_site_precision": sum(sites[c] in pool_sites for c in fixed["cases"]) / len(fixed["cases"]),
        "paired_variance_ratio": variance_ratio,
    }
    details = {"workdir": str(workdir), "task": task, "fold": args.fold, "k": adaptive["k"],
               "fixed_repeats": args.fixed_repeats, "adaptive_draws": adaptive["draws"], "fixed_draws": fixed["draws"],
               "adaptive_wall_s": adaptive["wall_time_s"], "fixed_wall_s": fixed["wall_time_s"],
               "scoring_draws_per_s": scoring_rate,
               "raw_forward_draws_per_s": raw_rate, "fixed_run_draws_per_s": fixed["draws"] / fixed["wall_time_s"], "adaptive_buffer": adaptive["buffer"], "fixed_buffer": fixed["buffer"],
               "adaptive_all_settled": adaptive["all_settled"], "device": args.device, **result}
    (workdir / "bench_mds_result.json").write_text(json.dumps(details, indent=2) + "\n")
    print(json.dumps(details, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
