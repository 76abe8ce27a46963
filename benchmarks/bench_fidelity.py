"""Fidelity benchmark (on demand, not in CI): every method over the same tasks, budget and seeds.

Builds in --workdir (reusing what exists; every ``medseqft run`` resumes where it stopped): generated
data, the pool planned and a foundation pre-trained at --scale (nnunetv2_medseqft/scales.py), then
``medseqft run`` for each method and seed over --tasks sequential tasks and the unseen tasks (not for the
independent task models of ``parallel``), plus ``scratch`` (parallel FFT from a random initialisation of the same
network: what pre-training buys) and ``parallel-matched`` (parallel FFT for the epochs of MedSeqFT's stages A + B:
whether MedSeqFT's gain is more than its extra iterations). ``multitask`` (the upper reference: one model trained on
every task's data at once, which a sequential user never has) gets the epochs of all the task models it replaces and
no unseen tasks.
Prints the per-method table (mean ± sd over seeds), the compute of each method and the paired
differences per seed.

The LAST line printed is a JSON object:
  medseqft_minus_parallel_dice   mean over seeds of (MedSeqFT - parallel FFT) mean task Dice, points 0-100
  medseqft_minus_seqfft_dice     the same against sequential FFT
  medseqft_minus_parallel_matched_dice  against parallel FFT trained as many epochs as MedSeqFT's stages A + B
  mds_minus_random_dice          MedSeqFT with the MDS buffer - with a random buffer
  unseen_transfer_minus_m0_dice  MedSeqFT: unseen-task Dice from the final body - from M0
  unseen_medseqft_minus_seqfft_dice  unseen-task Dice from MedSeqFT's final body - from seqFFT's
  bwt_medseqft_minus_seqfft, bwt_encoder_medseqft_minus_seqfft  less forgetting than seqFFT when > 0
  per_seed                       each difference per seed
  pretraining_gain_dice          parallel FFT from M0 - from a random initialisation (mean task Dice)
  parallel_mean_dice             mean task Dice of parallel FFT
  methods                        per method: mean/sd of mean_dice, mean_hd95, acc, bwt, bwt_encoder, fwt,
                                 unseen_run, unseen_m0
  compute                        per method and seed (mean over seeds): training iterations, train and wall minutes;
                                 per sequential task: iterations and minutes of selection + training
  per_task_dice                  per method, mean over seeds of each task's Dice (``medseqft F_t``: its stage-A model)
  decomposition                  MedSeqFT - parallel FFT split per seed into the chain (seqFFT - parallel FFT), the
                                 chain's history under MedSeqFT (its F_t - seqFFT) and stage B (its M_t - F_t)
  scale, budget                  what was run
  chosen_on_fold, reported_fold  the fold whose results chose the defaults (``--chosen-on-fold``) and this run's fold
  runs                           the runs the tables are computed from

Full protocol at the CPU scale: ``python benchmarks/bench_fidelity.py --workdir W`` (4 tasks + 2 unseen,
3 seeds, every method); ``--jobs 2`` runs two at a time with one torch thread each (wall minutes per method are
then those of a shared machine: compare them within one layout).
Smoke run: ``--scale tiny --seeds 0 --tasks 2 --unseen 1``.

``--archive DIR`` makes the protocol resumable across machines (a workdir does not outlive its machine; DIR is
meant to be committed): DIR keeps the foundation (restored into a new workdir instead of pre-training again, so
every seed's methods start from the same M0 wherever they ran) and each finished run's scores (results.json,
manifest.json, overlays); a run found there is not trained again, and the tables are computed from DIR.
``--report-only`` prints the tables of what DIR holds so far (each method with its finished seeds; differences
paired over the seeds both methods have), without data, foundation or training.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_mds import POOL_ID, add_scale_args, build_foundation, random_init_foundation, set_env  # noqa: E402

from nnunetv2_medseqft.method.settings import RFTSettings  # noqa: E402

ALL_METHODS = ("medseqft", "seqfft", "parallel", "random-buffer", "scratch", "parallel-matched", "lora", "multitask")
# independent task models (the last one is no "final body" of a sequence) and the multitask reference (no sequence)
NO_UNSEEN = ("parallel", "scratch", "parallel-matched", "multitask")
DIFFERENCES = {"medseqft_minus_parallel_dice": ("medseqft", "parallel", "mean_dice"),
               "medseqft_minus_seqfft_dice": ("medseqft", "seqfft", "mean_dice"),
               "mds_minus_random_dice": ("medseqft", "random-buffer", "mean_dice"),
               "pretraining_gain_dice": ("parallel", "scratch", "mean_dice"),
               "medseqft_minus_parallel_matched_dice": ("medseqft", "parallel-matched", "mean_dice"),
               "unseen_medseqft_minus_seqfft_dice": ("medseqft", "seqfft", "unseen_run"),
               "bwt_medseqft_minus_seqfft": ("medseqft", "seqfft", "bwt"),
               "bwt_encoder_medseqft_minus_seqfft": ("medseqft", "seqfft", "bwt_encoder")}


FOUNDATION_FILES = ("fold_all/checkpoint_final.pth", "plans.json", "dataset.json", "dataset_fingerprint.json")
RUN_FILES = ("results.json", "manifest.json", "overlays")


def run_name(method: str, seed: int, fold: str) -> str:
    return f"fidelity-{method}-s{seed}-f{fold}"


def restore_foundation(archive: Path, workdir: Path) -> None:
    """Put the archived foundation where ``build_foundation`` looks for it, unless the workdir has one."""
    saved = archive / "foundation"
    if not saved.is_dir():
        return
    rel = json.loads((saved / "foundation.json").read_text())["folder"]
    target = workdir / "nnUNet_results" / rel
    if not (target / FOUNDATION_FILES[0]).is_file():
        for name in FOUNDATION_FILES:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(saved / name, target / name)


def archive_foundation(archive: Path, workdir: Path, f: Path) -> str:
    """Store the foundation the first time; afterwards refuse a workdir whose foundation is another one (its
    runs would not be paired with the archived ones). Returns the checkpoint's sha256."""
    from nnunetv2_medseqft.checkpoints import sha256_file

    digest, saved = sha256_file(str(f)), archive / "foundation"
    if (saved / "foundation.json").is_file():
        kept = json.loads((saved / "foundation.json").read_text())["sha256"]
        if kept != digest:
            raise SystemExit(f"{f} is not the foundation archived in {saved} (sha256 {kept[:12]}, this one "
                             f"{digest[:12]}): use a new workdir (the archived foundation is restored into it) "
                             "or a new --archive.")
        return digest
    trainer_folder = f.parent.parent
    for name in FOUNDATION_FILES:
        (saved / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(trainer_folder / name, saved / name)
    info = {"folder": str(trainer_folder.relative_to(workdir / "nnUNet_results")), "sha256": digest}
    (saved / "foundation.json").write_text(json.dumps(info, indent=1) + "\n")
    return digest


def archive_run(archive: Path, name: str, digest: str) -> None:
    from nnunetv2_medseqft.sequence.layout import run_folder

    src, dst = Path(run_folder(name)), archive / "runs" / name
    tmp = dst.with_name(dst.name + ".partial")  # never a half-copied run that looks finished
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for item in RUN_FILES:
        if (src / item).is_dir():
            shutil.copytree(src / item, tmp / item)
        elif (src / item).is_file():
            shutil.copy2(src / item, tmp / item)
    (tmp / "archive.json").write_text(json.dumps({"foundation_sha256": digest, "machine": _machine(),
                                                  "archived": time.strftime("%Y-%m-%d %H:%M")}) + "\n")
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


def method_command(args, f: Path, method: str, seed: int) -> list[str]:
    """The ``medseqft run`` command of one method and seed (the benchmark's own methods mapped onto run's)."""
    from nnunetv2_medseqft.scales import get_scale

    name = run_name(method, seed, args.fold)
    tasks = [str(POOL_ID + 1 + i) for i in range(args.tasks)]
    unseen = [str(POOL_ID + 5 + i) for i in range(args.unseen)]
    if method in NO_UNSEEN:  # no sequence whose final body could pass anything on: its unseen runs would cost
        unseen = []          # two trainings per task and answer nothing the goals ask
    epochs = args.epochs
    if method == "scratch":  # parallel FFT from a random initialisation
        f, method = random_init_foundation(f, seed), "parallel"
    if method == "parallel-matched":  # parallel FFT for as many epochs as MedSeqFT's stages A + B (budget=fft_full)
        method, epochs = "parallel", epochs + RFTSettings().stage_b_extra_epochs(epochs)
    if method == "multitask":  # one model for every task's cases: the budget of all the task models it replaces
        epochs *= len(tasks)
    cmd = [sys.executable, "-m", "nnunetv2_medseqft.cli.main", "run", "--foundation", str(f), "--datasets", *tasks,
           "--method", method, "--name", name, "--seed", str(seed), "--fold", args.fold, "--device", args.device,
           "--epochs", str(epochs), "--iterations", str(args.iterations), "--val-iterations",
           str(args.val_iterations), "--mds", f"repeats={args.mds_repeats}", *get_scale(args.scale).recipe_args()]
    if unseen:
        cmd += ["--unseen", *unseen]
    return cmd


def run_method(args, f: Path, method: str, seed: int) -> str:
    from nnunetv2_medseqft.threads import threads_env

    name, cmd = run_name(method, seed, args.fold), method_command(args, f, method, seed)
    started = time.time()
    if args.jobs == 1:
        print(f"== {name}", flush=True)
        proc = subprocess.run(cmd)
    else:  # runs side by side: each with its share of the cores, its console output in a file
        log = Path(args.workdir) / "fidelity_logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        print(f"== {name} (output: {log})", flush=True)
        env = {**os.environ, **threads_env(args.jobs)}
        with open(log, "a") as out:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed; re-run this benchmark to resume it.")
    print(f"   {name}: {(time.time() - started) / 60:.1f} min", flush=True)
    if args.archive:
        archive_run(args.archive, name, args.foundation_sha256)
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
    means = {key: _mean(values) for key, values in per_seed.items()}
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
    p.add_argument("--chosen-on-fold", default="0",
                   help="the fold whose results chose today's defaults (recorded; report on another fold)")
    p.add_argument("--epochs", type=int, default=None, help="per task (default: the scale's)")
    p.add_argument("--iterations", type=int, default=None, help="per epoch (default: the scale's)")
    p.add_argument("--val-iterations", type=int, default=None, help="per epoch (default: the scale's)")
    p.add_argument("--mds-repeats", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once, each with cores/jobs torch threads (2 on 2 cores: 1.35x the iterations)")
    p.add_argument("--archive", type=Path, default=None,
                   help="folder (to commit) that keeps the foundation and every finished run's scores")
    p.add_argument("--report-only", action="store_true",
                   help="only the tables of the --archive's finished runs (each method with the seeds it has)")
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
    names = [run_name(m, s, args.fold) for s in args.seeds for m in args.methods]
    if args.archive:
        args.archive = args.archive.resolve()
    if args.report_only:  # the tables of what is archived (a protocol under way): no data, no foundation, no training
        if not args.archive:
            raise SystemExit("--report-only reads the runs of an --archive: name it.")
        names = [n for n in names if _archived(args.archive, n)]
        if not names:
            raise SystemExit(f"No run of these methods, seeds and fold is archived in {args.archive}.")
    else:
        if args.archive:
            restore_foundation(args.archive, workdir)
        f = build_foundation(workdir, scale, args.device, pretrain_trainer=args.pretrain_trainer)
        if args.archive:
            args.foundation_sha256 = archive_foundation(args.archive, workdir, f)
        todo = [(m, s) for s in args.seeds for m in args.methods
                if not _archived(args.archive, run_name(m, s, args.fold))]
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # in order: a seed's methods finish before the next seed
            list(pool.map(lambda ms: run_method(args, f, *ms), todo))
    folders = [str(args.archive / "runs" / n) if _archived(args.archive, n) else run_folder(n) for n in names]
    labels = [_label(n) for n in names]  # scratch & co. run as method parallel
    rows = compare_rows([{**load_results(d), "method": label} for d, label in zip(folders, labels)])
    report = write_report(folders, out=str(workdir / "fidelity_report"), labels=labels)
    per_seed, means = differences(rows)
    by_label = {(label, s): d for d, label, s in zip(folders, labels, [n.rsplit("-s", 1)[1].split("-")[0] for n in names])}
    per_task, parts = per_task_dice(by_label), decomposition(by_label)
    compute = {m: _compute([folders[names.index(n)] for n in rn], args.epochs, args.iterations)
               for m, rn in _by_method(names).items()}
    budget = {"pretrain_trainer": args.pretrain_trainer or scale.pretrain_trainer, "tasks": args.tasks, "fold": args.fold,
              "unseen": args.unseen, "seeds": args.seeds, "epochs": args.epochs, "iterations": args.iterations,
              "mds_repeats": args.mds_repeats, "device": args.device, "jobs": args.jobs, "machine": _machine(),
              "hours": round((time.time() - started) / 3600, 2)}
    if args.report_only:  # this command trained nothing: state the archived runs' own wall time instead
        runs_per_method = {m: len(rn) for m, rn in _by_method(names).items()}
        budget.update(jobs=None, hours=None, run_hours=round(
            sum(c["wall_minutes"] * runs_per_method[m] for m, c in compute.items()) / 60, 1))
    print()
    print(markdown_table(rows))
    print()
    print("compute per seed (mean over seeds): " + "; ".join(
        f"{m} {c['iterations']} iterations, {c['train_minutes']} train min, {c['wall_minutes']} wall min"
        for m, c in compute.items()))
    print("per sequential task (selection + training): " + "; ".join(
        f"{m} {c['task_iterations']} iterations, {c['task_minutes']} min" for m, c in compute.items()))
    for key, values in per_seed.items():
        print(f"{key}: mean {means[key]} per seed {({s: round(v, 2) for s, v in values.items()})}")
    print()
    print(per_task_table(per_task))
    for key, values in parts.items():
        print(f"{key}: mean {_mean(values)} per seed {({s: round(v, 2) for s, v in values.items()})}")
    print(f"report: {report}")
    methods = {m: {k: {"mean": v["mean"], "sd": v["sd"]} for k, v in metrics.items()} for m, metrics in rows.items()}
    parallel = rows.get("parallel", {}).get("mean_dice", {}).get("mean")
    print(json.dumps({**means, "parallel_mean_dice": parallel, "per_seed": per_seed, "methods": methods,
                      "compute": compute, "per_task_dice": per_task,
                      "decomposition": {k: {"mean": _mean(v), "per_seed": v} for k, v in parts.items()}, "scale": scale.name, "budget": budget,
                      "chosen_on_fold": args.chosen_on_fold, "reported_fold": args.fold, "runs": names}))


def _task_means(folder: str, model: str) -> dict:
    """Task -> Dice of the run's ``model`` (M or F; F falls back to M for methods without a stage-A model)."""
    scores = json.loads((Path(folder) / "results.json").read_text())["scores"]
    return {t: (v.get(model) or v["M"])["mean"]["dice"] for t, v in scores.items()}


def per_task_dice(by_label: dict) -> dict:
    """Method -> task -> mean over seeds of the task's Dice; MedSeqFT's stage-A models as ``medseqft F_t``."""
    out: dict = {}
    for (label, _), folder in by_label.items():
        for model, key in (("M", label), ("F", f"{label} F_t")):
            if model == "F" and label not in ("medseqft", "random-buffer"):
                continue
            for task, dice in _task_means(folder, model).items():
                out.setdefault(key, {}).setdefault(task, []).append(dice)
    return {k: {t: round(sum(v) / len(v), 2) for t, v in tasks.items() if None not in v} for k, tasks in out.items()}


def per_task_table(per_task: dict) -> str:
    tasks = list(next(iter(per_task.values()), {}))
    lines = ["| method | " + " | ".join(t.split("_", 1)[-1] for t in tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    lines += [f"| {m} | " + " | ".join(f"{v.get(t, float('nan')):.1f}" for t in tasks) + " |" for m, v in per_task.items()]
    return "\n".join(lines)


def decomposition(by_label: dict) -> dict:
    """Per seed, MedSeqFT - parallel FFT (mean task Dice) = chain + history + stage B, where chain = seqFFT -
    parallel FFT (what training the tasks in sequence gives), history = MedSeqFT's F_t - seqFFT (the same stage-A
    recipe, started from MedSeqFT's earlier M_t instead of seqFFT's models) and stage B = M_t - F_t."""
    def mean(label, seed, model):
        folder = by_label.get((label, seed))
        values = list(_task_means(folder, model).values()) if folder else [None]
        return None if None in values else sum(values) / len(values)

    parts: dict = {"chain_seqfft_minus_parallel": {}, "history_medseqft_ft_minus_seqfft": {},
                   "stage_b_medseqft_mt_minus_ft": {}}
    for seed in sorted({s for _, s in by_label}):
        par, seq = mean("parallel", seed, "M"), mean("seqfft", seed, "M")
        f_t, m_t = mean("medseqft", seed, "F"), mean("medseqft", seed, "M")
        if None in (par, seq, f_t, m_t):
            continue
        for key, value in zip(parts, (seq - par, f_t - seq, m_t - f_t)):
            parts[key][int(seed)] = value
    return parts


def _mean(values: dict):
    return round(sum(values.values()) / len(values), 2) if values else None


def _label(name: str) -> str:
    """The benchmark's method of a run name (``run_name``)."""
    return name[len("fidelity-"):].rsplit("-s", 1)[0]


def _by_method(names: list[str]) -> dict:
    out: dict = {}
    for n in names:
        out.setdefault(_label(n), []).append(n)
    return out


def _machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _archived(archive: Path | None, name: str) -> bool:
    return bool(archive) and (archive / "runs" / name / "results.json").is_file()


def _compute(folders: list[str], epochs: int, iterations: int) -> dict:
    """Per seed: training iterations (the epochs each task model logged, stage B included; ``epochs`` for each
    unseen-task model; a shared M0 reference counts for the run that trained it) and minutes from the run's
    manifest (train steps, and all steps); per sequential task: its iterations and the minutes of its selection
    (MDS) and training, what a user pays for one task."""
    per = []
    for folder in folders:
        steps = json.loads((Path(folder) / "manifest.json").read_text())["steps"]
        results = json.loads((Path(folder) / "results.json").read_text())
        curves = results.get("curves", {})
        train = [s for k, s in steps.items()
                 if k.startswith("train/") or (k.startswith("unseen/") and not k.endswith("/evaluate"))]
        task = [s for k, s in steps.items() if k.startswith(("train/", "select/"))]
        n_unseen = sum(k.startswith("unseen/") and not k.endswith("/evaluate") for k in steps)
        task_epochs = sum(len(c.get("train_losses", [])) for c in curves.values())
        n_tasks = max(1, len(results.get("scores", curves)))  # multitask: one training for all the tasks it scores
        per.append(((task_epochs + n_unseen * epochs) * iterations, _minutes(train), _minutes(steps.values()),
                    task_epochs * iterations / n_tasks, _minutes(task) / n_tasks))
    mean = [round(sum(v) / len(v), 1) for v in zip(*per)]
    return {"iterations": int(mean[0]), "train_minutes": mean[1], "wall_minutes": mean[2],
            "task_iterations": int(mean[3]), "task_minutes": mean[4]}


def _minutes(steps) -> float:
    return sum(s.get("seconds") or 0 for s in steps) / 60


if __name__ == "__main__":
    main()
