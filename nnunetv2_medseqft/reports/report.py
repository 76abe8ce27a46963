"""``medseqft report`` and ``medseqft compare``: tables and plots from the ``results.json`` of finished runs.

A run is scored while it goes, so any part of ``results.json`` may be missing or null: tables show
"-" for it and plots leave it out. Dice is in points (0-100), HD95 in mm.
"""

from __future__ import annotations

import math
import os
import re
import statistics

from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.jsonio import read_json, write_json_atomic
from nnunetv2_medseqft.reports.overlays import dice_per_site, overlay_file, plot_overlay
from nnunetv2_medseqft.sequence.layout import RESULTS_FILE, resolve_run

RESULTS_FORMAT = "medseqft-run-results/"
REPORT_FILE = "report.md"
ANALYSIS_FOLDER = "analysis"

# compare columns: key in compare_rows -> table header
METRICS = {
    "mean_dice": "Dice",
    "mean_hd95": "HD95 (mm)",
    "acc": "ACC",
    "bwt": "BWT",
    "bwt_encoder": "BWT (encoder)",
    "fwt": "FWT",
    "unseen_run": "Unseen Dice (run)",
    "unseen_m0": "Unseen Dice (M0)",
    "unseen_gain": "Unseen gain",
    "task_epochs": "Epochs / task",
}
MODEL_NAMES = {"M": "M (task model)", "F": "F (stage A)"}
DEFINITIONS = (
    "R[i][j] is the Dice on task j of the body after step i (row 0 = the foundation M0), each with task j's head. "
    "**ACC** = mean over tasks of the last row. "
    "**BWT** = mean over j < T of R[T][j] - R[j][j] (negative = forgetting). "
    "**BWT (encoder)**: the same with the final body's encoder under task j's own decoder and head, so that only "
    "what the encoder forgot counts. "
    "**FWT** = mean over j >= 2 of R[j-1][j] - R[0][j]: the body before task j against the foundation body. "
    "Unseen values are averaged over the unseen datasets; the gain is from-run minus from-M0. "
    "**Epochs / task**: the epochs each task model trained (MedSeqFT: stages A and B), what a task costs "
    "in training when the runs share the iterations per epoch. "
    "Each cell is the mean ± sd over seeds (sd only with more than one seed)."
)


# ---------------------------------------------------------------- reading


def load_results(folder: str) -> dict:
    """The run's ``results.json``; ``run`` defaults to the folder name so every run can be named in messages."""
    path = os.path.join(folder, RESULTS_FILE)
    if not os.path.isfile(path):
        raise MedSeqFTError(f"{folder} has no {RESULTS_FILE} yet: the run has not been evaluated; "
                            "finish it with `medseqft run` (its evaluation step writes the scores).")
    try:
        results = read_json(path)
    except ValueError as e:
        raise MedSeqFTError(f"{path} is not valid JSON ({e}): re-run the evaluation step of `medseqft run`.") from e
    if not isinstance(results, dict) or not str(results.get("format") or RESULTS_FORMAT).startswith(RESULTS_FORMAT):
        raise MedSeqFTError(f"{path} is not a medseqft results file (format {RESULTS_FORMAT}*): "
                            "give the folder of a `medseqft run`.")
    results["run"] = results.get("run") or os.path.basename(os.path.normpath(folder))
    return results


def _get(obj, *keys):
    """``obj[k1][k2]...``, or None where any level is missing or not a mapping/list."""
    for key in keys:
        try:
            obj = obj[key]
        except (KeyError, IndexError, TypeError):
            return None
    return obj


def _num(value) -> float | None:
    """A finite number, else None (null, NaN, a string or a bool are all 'missing')."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _tasks(results: dict) -> list:
    return list(results.get("tasks") or [])


def _unseen_datasets(results: dict) -> list:
    """The declared unseen datasets first, then any other that has scores."""
    names = list(results.get("unseen") or [])
    return names + [n for n in (results.get("unseen_scores") or {}) if n not in names]


def _unseen_dice(results: dict, dataset: str, source: str) -> float | None:
    """source: 'from_run' (the run's final body) or 'from_m0' (the foundation body)."""
    return _num(_get(results, "unseen_scores", dataset, source, "mean", "dice"))


def _seed_values(results: dict) -> dict:
    """The compare metrics of one run; unseen values averaged over unseen datasets first."""
    summary = results.get("summary") or {}
    unseen = _unseen_datasets(results)
    run = [_unseen_dice(results, d, "from_run") for d in unseen]
    m0 = [_unseen_dice(results, d, "from_m0") for d in unseen]
    return {
        "mean_dice": _num(summary.get("mean_dice")),
        "mean_hd95": _num(summary.get("mean_hd95")),
        "acc": _num(summary.get("acc")),
        "bwt": _num(summary.get("bwt")),
        "bwt_encoder": _num(summary.get("bwt_encoder")),
        "fwt": _num(summary.get("fwt")),
        "unseen_run": _mean(run),
        "unseen_m0": _mean(m0),
        # only datasets scored both ways, so a half-scored dataset cannot fake a gain
        "unseen_gain": _mean(r - m for r, m in zip(run, m0) if r is not None and m is not None),
        "task_epochs": _mean(len(_get(c, "train_losses") or []) or None for c in (results.get("curves") or {}).values()),
    }


# ---------------------------------------------------------------- compare


def _stats(per_seed: dict) -> dict:
    values = [v for v in per_seed.values() if v is not None]
    return {
        "mean": _mean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else None,  # sample sd over seeds
        "n": len(values),
        "per_seed": per_seed,
    }


def _by_method(results_list) -> dict:
    """method -> {seed: results}, refusing a second run of the same method and seed (it would double-weight it)."""
    groups: dict = {}
    for results in results_list:
        method, seed = results.get("method") or "unknown", results.get("seed")
        seeds = groups.setdefault(method, {})
        if seed in seeds:
            raise MedSeqFTError(f"Runs {seeds[seed].get('run')!r} and {results.get('run')!r} are both method {method!r} "
                                f"with seed {seed}: a method may appear once per seed; drop one of them.")
        seeds[seed] = results
    return groups


def compare_rows(results_list) -> dict:
    """method -> {metric: {"mean", "sd", "n", "per_seed": {seed: value}}}, methods in order of appearance.

    ``results_list`` holds the dicts of ``load_results``. ``per_seed`` lists every seed of the method (None
    where the run has no value), so its length is the number of seeds; ``n`` counts the seeds with a value.
    """
    rows = {}
    for method, seeds in _by_method(results_list).items():
        values = {seed: _seed_values(results) for seed, results in seeds.items()}
        rows[method] = {metric: _stats({seed: v[metric] for seed, v in values.items()}) for metric in METRICS}
    return rows


def _fmt(value, digits: int = 1) -> str:
    value = _num(value)
    return "-" if value is None else f"{value:.{digits}f}"


def _fmt_stats(stats: dict) -> str:
    if not stats["n"]:
        return "-"
    mean = _fmt(stats["mean"])
    return f"{mean} ± {_fmt(stats['sd'])}" if stats["sd"] is not None else mean


def _cell(text) -> str:
    return str(text).replace("|", "\\|")


def _table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_table(rows: dict) -> str:
    """The compare table: one row per method, mean ± sd over seeds."""
    body = []
    for method, metrics in rows.items():
        seeds = len(next(iter(metrics.values()))["per_seed"]) if metrics else 0
        body.append([method, seeds] + [_fmt_stats(metrics[m]) for m in METRICS])
    return _table(["Method", "Seeds"] + list(METRICS.values()), body)


# ---------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, also on machines without a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _mean_sd(values) -> tuple[float, float]:
    """Bar height and error; NaN draws nothing (no bar without a value, no error bar from a single seed)."""
    values = [v for v in values if v is not None]
    if not values:
        return math.nan, math.nan
    return sum(values) / len(values), statistics.stdev(values) if len(values) > 1 else math.nan


def _grouped_bars(ax, groups: list, series: dict) -> None:
    """series: label -> list (one per group) of value lists over seeds."""
    width = 0.8 / max(len(series), 1)
    for k, (label, per_group) in enumerate(series.items()):
        heights, errors = zip(*(_mean_sd(values) for values in per_group))
        offsets = [i - 0.4 + width * (k + 0.5) for i in range(len(groups))]
        ax.bar(offsets, heights, width, yerr=errors, capsize=3, label=label)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([_short(g) for g in groups], rotation=20, ha="right")


def _short(dataset: str) -> str:
    """Dataset501_MSFTLiver -> MSFTLiver: tick labels stay readable."""
    return re.sub(r"\bDataset\d+_", "", str(dataset))


def _union(lists) -> list:
    seen = []
    for items in lists:
        seen += [x for x in items if x not in seen]
    return seen


def plot_dice_per_task(results_list, path: str) -> str | None:
    """Task-model Dice per task (x) per method (bars), mean ± sd over seeds; None without any score."""
    groups = _by_method(results_list)
    tasks = _union(_tasks(r) for r in results_list)
    series = {method: [[_num(_get(r, "scores", t, "M", "mean", "dice")) for r in seeds.values()] for t in tasks]
              for method, seeds in groups.items()}
    if not any(v is not None for per_task in series.values() for values in per_task for v in values):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(tasks) * max(1, len(series)) / 2 + 2), 4))
    _grouped_bars(ax, tasks, series)
    ax.set_ylabel("Dice (task model M)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize="small")
    ax.set_title("Dice per task")
    return _save(fig, path)


def _matrix_rows(results: dict) -> list:
    """Row labels of R: the foundation, then the body after each task."""
    rows = _get(results, "R", "rows") or ["M0"] + _tasks(results)
    return ["M0" if i == 0 else f"after {row}" for i, row in enumerate(rows)]


def _matrix_cols(results: dict) -> list:
    return list(_get(results, "R", "cols") or _tasks(results))


def _matrix_value(results: dict, key: str, i: int, j: int) -> float | None:
    return _num(_get(results, "R", key, i, j))


def plot_r_matrix(results: dict, path: str) -> str | None:
    """Annotated Dice heatmap of R; None while R has no value."""
    rows, cols = _matrix_rows(results), _matrix_cols(results)
    grid = [[_matrix_value(results, "dice", i, j) for j in range(len(cols))] for i in range(len(rows))]
    if not any(v is not None for row in grid for v in row):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.4 * len(cols) + 3, 0.6 * len(rows) + 1.8))
    ax.imshow([[math.nan if v is None else v for v in row] for row in grid], cmap="viridis", vmin=0, vmax=100,
              aspect="auto")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, _fmt(v), ha="center", va="center", color="white" if v is not None and v < 60 else "black")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([_short(c) for c in cols], rotation=20, ha="right")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([_short(r) for r in rows])
    ax.set_xlabel("evaluated on task (with its head)")
    ax.set_title(f"R matrix (Dice): {results['run']}")
    return _save(fig, path)


def plot_unseen_transfer(results_list, path: str) -> str | None:
    """Per unseen dataset: Dice from M0 vs from the final body, per method (mean ± sd over seeds)."""
    groups = _by_method(results_list)
    datasets = [d for d in _union(_unseen_datasets(r) for r in results_list)
                if any(_unseen_dice(r, d, s) is not None for r in results_list for s in ("from_run", "from_m0"))]
    if not datasets:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(datasets), figsize=(max(4.0, 1.2 * len(groups) + 2) * len(datasets), 4),
                             squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        series = {label: [[_unseen_dice(r, dataset, source) for r in seeds.values()] for seeds in groups.values()]
                  for label, source in (("from M0", "from_m0"), ("from run", "from_run"))}
        _grouped_bars(ax, list(groups), series)
        ax.set_ylim(0, 100)
        ax.set_ylabel("Dice")
        ax.set_title(_short(dataset))
        ax.legend(fontsize="small")
    return _save(fig, path)


def _curve(values) -> list:
    return [math.nan if _num(v) is None else v for v in (values or [])]


def plot_curves(results: dict, path: str) -> str | None:
    """Training curves per task: losses on the left axis, EMA foreground Dice on the right; None without curves."""
    curves = {task: c for task, c in (results.get("curves") or {}).items()
              if isinstance(c, dict) and any(c.get(k) for k in ("train_losses", "val_losses", "ema_fg_dice"))}
    if not curves:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(curves), 1, figsize=(7, 3 * len(curves)), squeeze=False)
    for ax, (task, c) in zip(axes[:, 0], curves.items()):
        for key, label, style in (("train_losses", "train loss", "-"), ("val_losses", "val loss", "--")):
            if c.get(key):
                ax.plot(_curve(c[key]), style, label=label)
        twin = ax.twinx()
        if c.get("ema_fg_dice"):
            twin.plot(_curve(c["ema_fg_dice"]), color="tab:green", label="EMA fg Dice")
        if _num(c.get("stage_b_start")) is not None:
            ax.axvline(c["stage_b_start"], color="grey", linestyle=":", label="stage B starts")
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        twin.set_ylabel("EMA fg Dice")
        handles = ax.get_legend_handles_labels()
        twin_handles = twin.get_legend_handles_labels()
        twin.legend(handles[0] + twin_handles[0], handles[1] + twin_handles[1], fontsize="small", ncol=4,
                    loc="upper center", bbox_to_anchor=(0.5, -0.22))  # below the axes: the curves cross anyway
        ax.set_title(_short(task))
    return _save(fig, path)


# ---------------------------------------------------------------- report.md


def _file_label(name: str, taken: set) -> str:
    """A file-name-safe run label, unique within one report (runs from different roots may share a name)."""
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "run"
    label, k = base, 2
    while label in taken:
        label, k = f"{base}-{k}", k + 1
    taken.add(label)
    return label


def _image(path: str | None, out: str, alt: str) -> list:
    return [f"![{alt}]({os.path.relpath(path, out).replace(os.sep, '/')})", ""] if path else []


def _runs_section(results_list) -> list:
    rows = [[r["run"], r.get("method") or "-", _fmt(r.get("seed"), 0), _fmt(r.get("fold"), 0),
             ", ".join(_tasks(r)) or "-", ", ".join(r.get("unseen") or []) or "-"] for r in results_list]
    return ["## Runs", "", _table(["Run", "Method", "Seed", "Fold", "Tasks", "Unseen"], rows), ""]


def _scores_table(results: dict) -> str | None:
    """Task | Model | Region | Dice | HD95: the mean row of every model first, then its labels."""
    body = []
    for task, models in (results.get("scores") or {}).items():
        models = models or {}
        for model in [m for m in MODEL_NAMES if m in models] + sorted(m for m in models if m not in MODEL_NAMES):
            scores = models[model] or {}
            cases = _num(scores.get("cases"))
            region = f"mean ({cases:.0f} cases)" if cases is not None else "mean"
            name = MODEL_NAMES.get(model, model)
            body.append([task, name, region, _fmt(_get(scores, "mean", "dice")), _fmt(_get(scores, "mean", "hd95"))])
            for label, s in (scores.get("labels") or {}).items():
                body.append([task, name, label, _fmt(_get(s, "dice")), _fmt(_get(s, "hd95"))])
    return _table(["Task", "Model", "Region", "Dice", "HD95 (mm)"], body) if body else None


def _matrix_table(results: dict, key: str) -> str | None:
    if not _get(results, "R", key):
        return None
    cols = _matrix_cols(results)
    body = [[row] + [_fmt(_matrix_value(results, key, i, j)) for j in range(len(cols))]
            for i, row in enumerate(_matrix_rows(results))]
    return _table(["Body \\ task"] + cols, body)


def _unseen_table(results: dict) -> str | None:
    body = []
    for dataset in _unseen_datasets(results):
        run, m0 = _unseen_dice(results, dataset, "from_run"), _unseen_dice(results, dataset, "from_m0")
        body.append([dataset, _fmt(run), _fmt(m0), _fmt(run - m0 if run is not None and m0 is not None else None)])
    return _table(["Unseen dataset", "Dice from run", "Dice from M0", "Difference"], body) if body else None


def _site_table(results: dict) -> str | None:
    from nnunetv2_medseqft.paths import case_sites

    body = []
    for task, models in (results.get("scores") or {}).items():
        try:
            sites = case_sites(task)
        except MedSeqFTError:  # the raw dataset is not on this machine: no per-site table
            sites = {}
        for site, v in dice_per_site((models or {}).get("M") or {}, sites).items():
            body.append([task, site, str(v["cases"]), _fmt(v["dice"])])
    return _table(["Task", "Site", "Cases", "Dice"], body) if body else None


def _analysis_images(folder: str) -> list:
    """PNGs that analysis tools (landscape, parameter drift) leave in the run's ``analysis/`` folder."""
    analysis = os.path.join(folder, ANALYSIS_FOLDER)
    if not os.path.isdir(analysis):
        return []
    return [os.path.join(analysis, f) for f in sorted(os.listdir(analysis)) if f.lower().endswith(".png")]


def _run_section(folder: str, results: dict, label: str, out: str) -> list:
    lines = [f"## Run {results['run']}", "", f"Folder: `{folder}`", ""]
    parts = [
        ("Scores per task", _scores_table(results),
         "M is the exported task model M_t; F the stage-A full-fine-tuning model F_t (only some methods have it)."),
        ("R matrix (Dice)", _matrix_table(results, "dice"), None),
        ("R matrix (HD95, mm)", _matrix_table(results, "hd95"), None),
        ("R matrix, encoder only (Dice)", _matrix_table(results, "dice_encoder"),
         "The body's encoder with task j's own decoder and head (below the diagonal): what the encoder forgot."),
        ("Unseen transfer (Dice)", _unseen_table(results),
         "Models for each unseen dataset, started from the run's final body and from the foundation M0."),
    ]
    for title, table, note in parts:
        if table:
            lines += [f"### {title}", ""] + ([note, ""] if note else []) + [table, ""]
    sites = _site_table(results)
    if sites:
        lines += ["### Dice per acquisition site", "", "Exported model M_t; sites as `sites.json` names them.", "",
                  sites, ""]
    summary = results.get("summary") or {}
    lines += [f"ACC {_fmt(summary.get('acc'))}, BWT {_fmt(summary.get('bwt'))}, "
              f"BWT (encoder) {_fmt(summary.get('bwt_encoder'))}, FWT {_fmt(summary.get('fwt'))}.", ""]
    lines += _image(plot_r_matrix(results, os.path.join(out, f"r_matrix_{label}.png")), out, "R matrix")
    curves = plot_curves(results, os.path.join(out, f"curves_{label}.png"))
    if curves:
        lines += ["### Training curves", "", "A dotted line marks the epoch at which stage B started.", ""]
        lines += _image(curves, out, "training curves")
    overlays = [plot_overlay(overlay_file(folder, task), os.path.join(out, f"overlay_{label}_{_short(task)}.png"),
                             f"{_short(task)}, M_t") for task in _tasks(results)]
    if any(overlays):
        lines += ["### Segmentations", "", "The first validation case: the axial slice with the most ground truth.", ""]
        for path in filter(None, overlays):
            lines += _image(path, out, "validation slice, ground truth and prediction")
    analysis = _analysis_images(folder)
    if analysis:
        lines += ["### Analysis", ""]
        for path in analysis:
            lines += _image(path, out, os.path.splitext(os.path.basename(path))[0])
    return lines


def default_out(run_folders) -> str:
    """One run: its own folder. Several: no natural home, so the caller must choose."""
    if len(run_folders) == 1:
        return run_folders[0]
    raise MedSeqFTError(f"{len(run_folders)} runs given but no output folder: "
                        "pass --out DIR for a report across several runs.")


def write_report(run_folders, out: str | None = None, labels: list[str] | None = None) -> str:
    """Write ``report.md`` and its PNGs into ``out`` (default: the folder of a single run); returns report.md's path.
    ``labels``: the name each run's row goes under instead of its method (a benchmark's variants of one method)."""
    run_folders = list(run_folders)
    if not run_folders:
        raise MedSeqFTError("No run given: name at least one run folder.")
    out = os.path.abspath(out or default_out(run_folders))
    results_list = [load_results(f) for f in run_folders]
    for results, label in zip(results_list, labels or []):
        results["method"] = label
    rows = compare_rows(results_list)  # refuses a duplicate (method, seed) before anything is written
    os.makedirs(out, exist_ok=True)

    lines = ["# MedSeqFT report", ""] + _runs_section(results_list)
    lines += ["## Comparison", "", markdown_table(rows), "", DEFINITIONS, ""]
    lines += _image(plot_dice_per_task(results_list, os.path.join(out, "dice_per_task.png")), out, "Dice per task")
    lines += _image(plot_unseen_transfer(results_list, os.path.join(out, "unseen_transfer.png")), out,
                    "unseen transfer")
    taken: set = set()
    for folder, results in zip(run_folders, results_list):
        lines += _run_section(folder, results, _file_label(results["run"], taken), out)

    path = os.path.join(out, REPORT_FILE)
    with open(path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return path


# ---------------------------------------------------------------- CLI


def _cmd_report(args) -> int:
    path = write_report([resolve_run(r) for r in args.runs], args.out)
    print(f"report written: {path}")
    return 0


def _cmd_compare(args) -> int:
    rows = compare_rows([load_results(resolve_run(r)) for r in args.runs])
    table = markdown_table(rows)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    if args.json:
        write_json_atomic(rows, args.json)
    return 0


def configure_parser(parser, name: str) -> None:
    if name not in ("report", "compare"):
        raise ValueError(f"nnunetv2_medseqft.reports.report has no subcommand {name!r}")
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help="run name (under $nnUNet_results/medseqft_runs) or run folder")
    if name == "report":
        parser.add_argument("-o", "--out", metavar="DIR", default=None,
                            help="folder for report.md and the PNGs (default: the run folder; "
                                 "required with several runs)")
        parser.set_defaults(func=_cmd_report)
    else:
        parser.add_argument("--out", metavar="FILE.md", default=None, help="also write the table to this file")
        parser.add_argument("--json", metavar="FILE.json", default=None,
                            help="also write per-method mean, sd, n and per-seed values as JSON")
        parser.set_defaults(func=_cmd_compare)
