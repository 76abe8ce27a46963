"""MDS stopping rules replayed offline (on demand): choose the adaptive rule's settings on one fold, report on another.

Phase 1, ``score`` (slow, resumable): every case of each task (both folds' training cases) scored with R draws
(default 1000) of the foundation's SSL loss, drawn exactly as MDS draws them (``CommonDraws``, seed 0), one .npy per
case under WORKDIR/mds_losses/<dataset>/ (a case already there is skipped).

Phase 2, ``replay`` (seconds): for every candidate setting, the adaptive rule (``mds.adaptive_draws``, the code
``medseqft select`` runs) replayed on these losses for one fold's training cases, against the top K of all R draws
(the paper's fixed protocol on the same draws). Because draw j is the same for every case and depends on the seed
alone, the adaptive scoring's first n draws of a case are the first n columns of its row: the replay is the run.
``--orders P`` replays every rule also on P random orders of the draws (one order for all cases, so the draws stay
common), as if MDS had used another seed: forward fraction and Jaccard as mean and worst case over the orders.
Two checks of the goal itself follow, per fold and task: how often R fixed draws repeat their own top K (bootstrap
of the draws), and what a fixed-budget top-K rule (SAR) reproduces with exactly ``--goal`` of the draws.

    python benchmarks/bench_mds_rule.py score --workdir W --plans-name P [--tasks 1 2 3 4]
    python benchmarks/bench_mds_rule.py replay --workdir W --plans-name P --choose-fold 0 --report-fold 1

The LAST line of ``replay`` is a JSON object: the chosen setting (``chosen``, see ``choose_rule``: on the choosing
fold, the most conservative candidate within the forward-fraction goal whose buffer equals the fixed-R top K for every
task and order), and for the reporting fold ``forward_fraction`` and
``topk_jaccard`` per task (the first order: the seed MDS uses) with their means/worst over the orders.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_mds import set_env  # noqa: E402

# (rule, tolerance, confidence) candidates; rule "zone": a near-tie needs z se <= zone too (before 2026-12-05),
# "epsilon": a pair is settled once i's upper bound on mu_i - mu_o is <= the zone (epsilon-top-K)
CANDIDATES = [(rule, tol, conf) for rule in ("zone", "epsilon") for tol in (0.02, 0.05, 0.1)
              for conf in (0.99, 0.95)]


def task_names(workdir: Path, tasks: list[int], first_id: int = 500) -> list[str]:
    raw = workdir / "nnUNet_raw"
    return [next(raw.glob(f"Dataset{first_id + t:03d}_*")).name for t in tasks]


def all_cases(workdir: Path, task: str) -> list[str]:
    splits = json.loads((workdir / "nnUNet_preprocessed" / task / "splits_final.json").read_text())
    return sorted(set(splits[0]["train"]) | set(splits[0]["val"]))


def score(args) -> None:
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from tqdm import tqdm

    from nnunetv2_medseqft.method.buffer import prepare
    from nnunetv2_medseqft.method.mds import CaseScores, CommonDraws, SSLScorer, _Engine
    from nnunetv2_medseqft.method.settings import MDSSettings

    settings = MDSSettings(repeats=args.repeats)
    for task in task_names(args.workdir, args.tasks):
        inputs = prepare(task, 0, args.plans_name, settings=settings, log=lambda *_: None)
        out = args.workdir / "mds_losses" / task
        out.mkdir(parents=True, exist_ok=True)
        keys = [k for k in all_cases(args.workdir, task) if not (out / f"{k}.npy").is_file()]
        if not keys:
            continue
        scorer = SSLScorer(inputs.foundation, args.device)
        patch = tuple(inputs.key["patch_size"])
        dataset = infer_dataset_class(inputs.data_folder)(inputs.data_folder, identifiers=keys)
        draws = CommonDraws(settings.seed, patch, scorer.ssl_settings)
        for key in keys:
            t0, case = time.perf_counter(), CaseScores(key)
            _Engine(scorer, dataset, patch, settings.draws_per_batch, draws, tqdm(disable=True)).draw(case, args.repeats)
            np.save(out / f"{key}.partial.npy", np.asarray(case.losses, dtype=np.float64))
            os.replace(out / f"{key}.partial.npy", out / f"{key}.npy")
            print(f"{task} {key}: {args.repeats} draws in {time.perf_counter() - t0:.0f} s", flush=True)


def load_losses(workdir: Path, task: str) -> dict[str, np.ndarray]:
    folder = workdir / "mds_losses" / task
    return {p.name[:-4]: np.load(p) for p in sorted(folder.glob("*.npy")) if not p.name.endswith(".partial.npy")}


def fold_cases(workdir: Path, task: str, fold: int) -> list[str]:
    return json.loads((workdir / "nnUNet_preprocessed" / task / "splits_final.json").read_text())[fold]["train"]


def replay_task(losses: dict[str, np.ndarray], cases: list[str], settings, orders: list[np.ndarray]) -> list[dict]:
    """One record per draw order: draws used / fixed draws, Jaccard with the fixed-R top K, all pairs settled."""
    from nnunetv2_medseqft.method.mds import replay

    k = settings.buffer_size(len(cases))
    n_draws = min(len(losses[c]) for c in cases)
    fixed = set(sorted(cases, key=lambda c: (losses[c][:n_draws].mean(), c))[:k])
    out = []
    for order in orders:
        record = replay({c: losses[c][order] for c in cases}, k, dataclasses.replace(settings, max_repeats=n_draws))
        chosen = set(record["buffer"])
        out.append({"forward_fraction": record["draws"] / (n_draws * len(cases)),
                    "topk_jaccard": len(chosen & fixed) / len(chosen | fixed), "all_settled": record["all_settled"]})
    return out


def replay_fold(args, losses_by_task: dict, fold: int, candidates, orders) -> dict:
    from nnunetv2_medseqft.method.settings import MDSSettings

    table = {}
    for rule, tol, conf in candidates:
        settings = MDSSettings(tolerance=tol, confidence=conf, rule=rule)
        per_task = {}
        for task, losses in losses_by_task.items():
            cases = fold_cases(args.workdir, task, fold)
            missing = [c for c in cases if c not in losses]
            if missing:
                raise SystemExit(f"{task}: no losses for {missing}; run the score phase first.")
            per_task[task] = replay_task(losses, cases, settings, orders)
        table[(rule, tol, conf)] = per_task
    return table


def summarise(per_task: dict) -> dict:
    ff = [r["forward_fraction"] for rs in per_task.values() for r in rs]
    jac = [r["topk_jaccard"] for rs in per_task.values() for r in rs]
    return {"forward_fraction_mean": float(np.mean(ff)), "forward_fraction_max": float(np.max(ff)),
            "topk_jaccard_mean": float(np.mean(jac)), "topk_jaccard_min": float(np.min(jac)),
            "exact_share": float(np.mean([j == 1.0 for j in jac]))}


def print_table(title: str, table: dict) -> None:
    print(f"\n{title}")
    print(f"{'rule':<8} {'tol':>5} {'conf':>5}  {'fwd frac mean':>13} {'max':>6}  {'Jaccard mean':>12} {'min':>5}  exact")
    for (rule, tol, conf), per_task in table.items():
        s = summarise(per_task)
        print(f"{rule:<8} {tol:>5} {conf:>5}  {s['forward_fraction_mean']:>13.4f} {s['forward_fraction_max']:>6.3f}  "
              f"{s['topk_jaccard_mean']:>12.3f} {s['topk_jaccard_min']:>5.2f}  {s['exact_share']:.2f}")


def choose_rule(table: dict, goal: float) -> tuple:
    """The most conservative candidate (smallest tolerance, then highest confidence, then rule "zone", which
    settles fewer pairs) that reproduces the fixed-R top K on every task and order and needs at most ``goal`` of
    its draws on average: the budget the goal leaves is spent on safety, not on saving more draws (the cheapest
    exact candidate of one fold can be the first to fail on another). None within the goal: the cheapest exact."""
    exact = [c for c, per_task in table.items() if summarise(per_task)["exact_share"] == 1.0]
    if not exact:
        raise SystemExit("no candidate reproduces the fixed-R top K on every task and order of the choosing fold")
    within = [c for c in exact if summarise(table[c])["forward_fraction_mean"] <= goal]
    if within:
        return min(within, key=lambda c: (c[1], -c[2], c[0] != "zone"))
    return min(exact, key=lambda c: summarise(table[c])["forward_fraction_mean"])


def self_agreement(losses: dict[str, np.ndarray], cases: list[str], k: int, n_boot: int, rng) -> float:
    """How often R fixed draws repeat their own top K: the share of bootstrap resamples of the R draws (the same
    resampled draw indices for every case, so the draws stay common) whose top K equals the top K of all R. Where
    this is below 1, the fixed-R buffer itself is a coin flip at the boundary, and no cheaper rule can reproduce it
    reliably."""
    matrix = np.stack([losses[c] for c in cases])
    reference = set(np.argsort(matrix.mean(1), kind="stable")[:k])
    hits = [set(np.argsort(matrix[:, rng.integers(0, matrix.shape[1], matrix.shape[1])].mean(1),
                           kind="stable")[:k]) == reference for _ in range(n_boot)]
    return float(np.mean(hits))


def successive_accepts_rejects(matrix: np.ndarray, k: int, budget: int) -> tuple[set[int], int]:
    """Fixed-budget top-K identification (Bubeck, Wang & Viswanathan 2013, "SAR"): n - 1 phases with draw counts
    growing as 1 / (n + 1 - phase); after each, the case with the clearest gap is accepted (best) or rejected
    (worst). Every active case has the same draws, so the gaps are differences on common draws. (buffer, draws)."""
    n = matrix.shape[0]
    log_bar = 0.5 + sum(1.0 / i for i in range(2, n + 1))
    active, accepted, slots, drawn, n_prev = list(range(n)), [], k, 0, 0
    for phase in range(1, n):
        if slots in (0, len(active)):
            break
        n_k = max(n_prev, int(np.ceil((budget - n) / (log_bar * (n + 1 - phase)))))
        drawn, n_prev = drawn + (n_k - n_prev) * len(active), n_k
        means = matrix[active, :n_k].mean(1)
        order = np.argsort(means, kind="stable")
        if means[order[slots]] - means[order[0]] > means[order[-1]] - means[order[slots - 1]]:
            accepted.append(active.pop(int(order[0])))
            slots -= 1
        else:
            active.pop(int(order[-1]))
    if slots:
        means = matrix[active, :max(n_prev, 1)].mean(1)
        accepted += [active[i] for i in np.argsort(means, kind="stable")[:slots]]
    return set(accepted), drawn


def reference_checks(args, losses_by_task: dict, fold: int, orders, budget_fraction: float) -> dict:
    """Per task of ``fold``: the fixed-R top K's bootstrap self-agreement, and SAR's exact share and draws at
    ``budget_fraction`` of the fixed draws (over the draw orders)."""
    from nnunetv2_medseqft.method.settings import MDSSettings

    rng = np.random.default_rng(2024)
    out = {}
    for task, losses in losses_by_task.items():
        cases = fold_cases(args.workdir, task, fold)
        k = MDSSettings().buffer_size(len(cases))
        matrix = np.stack([losses[c] for c in cases])
        reference = set(np.argsort(matrix.mean(1), kind="stable")[:k])
        budget = int(budget_fraction * matrix.size)
        runs = [successive_accepts_rejects(matrix[:, order], k, budget) for order in orders]
        out[task] = {"self_agreement": self_agreement(losses, cases, k, 400, rng),
                     "sar_exact_share": float(np.mean([chosen == reference for chosen, _ in runs])),
                     "sar_forward_fraction": float(np.mean([d for _, d in runs]) / matrix.size)}
    return out


def print_reference_checks(fold: int, checks: dict, budget_fraction: float) -> None:
    print(f"\nfold {fold}: the fixed-R top K's own repeatability (400 bootstrap resamples of its draws) and a "
          f"fixed-budget rule (SAR) at {budget_fraction:.0%} of the draws")
    print(f"{'task':<26} {'R self-agreement':>16} {'SAR exact':>10} {'SAR fwd frac':>12}")
    for task, c in checks.items():
        print(f"{task:<26} {c['self_agreement']:>16.2f} {c['sar_exact_share']:>10.2f} {c['sar_forward_fraction']:>12.3f}")


def replay_main(args) -> None:
    losses_by_task = {t: load_losses(args.workdir, t) for t in task_names(args.workdir, args.tasks)}  # read once
    n_draws = min(len(v) for losses in losses_by_task.values() for v in losses.values())
    rng = np.random.default_rng(12345)
    orders = [np.arange(n_draws)] + [rng.permutation(n_draws) for _ in range(args.orders)]
    choose = replay_fold(args, losses_by_task, args.choose_fold, CANDIDATES, orders)
    print_table(f"fold {args.choose_fold} (choosing), {len(orders)} draw orders, tasks {args.tasks}", choose)
    chosen = choose_rule(choose, args.goal)
    report = replay_fold(args, losses_by_task, args.report_fold, [chosen, ("zone", 0.02, 0.99)], orders)
    print_table(f"fold {args.report_fold} (reporting): the chosen rule and the rule before", report)
    first = {task: rs[0] for task, rs in report[chosen].items()}
    checks = {fold: reference_checks(args, losses_by_task, fold, orders, args.goal)
              for fold in (args.choose_fold, args.report_fold)}
    for fold, c in checks.items():
        print_reference_checks(fold, c, args.goal)
    print(json.dumps({
        "chosen": {"rule": chosen[0], "tolerance": chosen[1], "confidence": chosen[2]},
        "chosen_on_fold": args.choose_fold, "reported_fold": args.report_fold, "fixed_repeats": n_draws,
        "draw_orders": len(orders),
        "forward_fraction": {t: round(r["forward_fraction"], 4) for t, r in first.items()},
        "topk_jaccard": {t: r["topk_jaccard"] for t, r in first.items()},
        "over_orders": {k: round(v, 4) for k, v in summarise(report[chosen]).items()},
        "before_over_orders": {k: round(v, 4) for k, v in summarise(report[("zone", 0.02, 0.99)]).items()},
        "reference_self_agreement": {f"fold{f}": {t: round(c["self_agreement"], 3) for t, c in checks[f].items()}
                                     for f in checks},
        "sar_at_goal_exact_share": {f"fold{f}": {t: round(c["sar_exact_share"], 3) for t, c in checks[f].items()}
                                    for f in checks},
    }))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=("score", "replay"))
    p.add_argument("--workdir", type=Path, required=True, help="a benchmark workdir with the tasks planned")
    p.add_argument("--plans-name", default="MedSeqFTPlans", help="plans of the tasks made by medseqft plan")
    p.add_argument("--tasks", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--repeats", type=int, default=1000, help="draws per case of the score phase")
    p.add_argument("--device", default="cpu")
    p.add_argument("--orders", type=int, default=20, help="random draw orders replayed besides the natural one")
    p.add_argument("--goal", type=float, default=0.05, help="forward fraction the chosen rule may use (default: 0.05)")
    p.add_argument("--choose-fold", type=int, default=0)
    p.add_argument("--report-fold", type=int, default=1)
    args = p.parse_args(argv)
    args.workdir = args.workdir.resolve()
    set_env(args.workdir)
    score(args) if args.phase == "score" else replay_main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
