"""Parameter variation of task models (``medseqft analyze params``).

params: per layer group (encoder stage i, transposed conv i, decoder stage i; segmentation head excluded,
it is task specific) the relative change ||theta_t - theta_0|| / ||theta_0|| of each task model against
the foundation body theta_0, and for every conv of each update M_t - start_t (start_t = M_(t-1) for
chained methods, else M0) the effective rank (Roy & Vetterli 2007: exp of the entropy of the normalised
singular values) of the weight update reshaped to [out, in * k^3], ignoring singular values below the
float32 rounding floor of the stored weights. A LoRA-merged update has effective rank <= the LoRA rank; a
full fine-tuning update is not limited.

Outputs go to the (first) run's ``analysis/`` folder by default, where ``medseqft report`` finds the PNGs.
"""

from __future__ import annotations

import math
import os
import re

import numpy as np
import torch

from nnunetv2_medseqft.checkpoints import body_of, is_head_key, load_checkpoint_file
from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.jsonio import write_json_atomic
from nnunetv2_medseqft.reports.landscape import ANALYSIS_FOLDER, check_same_architecture
from nnunetv2_medseqft.sequence.run_record import (
    read_run,
    run_foundation,
    task_models,
)

LORA_METHODS = ("medseqft", "random-buffer", "lora")  # their M_t - M_(t-1) is a merged LoRA update


# ---------------------------------------------------------------- parameter variation

_GROUPS = ((re.compile(r"^encoder\.stem\."), "stem"), (re.compile(r"^encoder\.stages\.(\d+)\."), "enc{}"),
           (re.compile(r"^decoder\.transpconvs\.(\d+)\."), "up{}"), (re.compile(r"^decoder\.stages\.(\d+)\."), "dec{}"))


def layer_group(key: str) -> str | None:
    """Encoder stage i -> 'enc i', transposed conv i -> 'up i', decoder stage i -> 'dec i'; None for the
    segmentation head and aliases of the same tensors (``decoder.encoder.*``, ``...all_modules.N.*``)."""
    if is_head_key(key) or key.startswith("decoder.encoder.") or ".all_modules." in key:
        return None
    for pattern, name in _GROUPS:
        m = pattern.match(key)
        if m:
            return name.format(*m.groups())
    return "other"


def effective_rank(matrix: torch.Tensor, floor: float = 0.0) -> float:
    """Roy & Vetterli 2007: exp(entropy of the singular values normalised to sum 1); 0 for a zero matrix.
    Singular values <= ``floor`` are dropped (see ``rounding_floor``)."""
    s = torch.linalg.svdvals(matrix.double())
    s = s[s > floor]
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def rounding_floor(shape, *weights: torch.Tensor) -> float:
    """Largest singular value float32 rounding of the stored weights can put into an [m, n] update:
    (sqrt(m) + sqrt(n)) * eps * max|w|. A small LoRA update (rank r) otherwise gains hundreds of tiny
    rounding singular values whose entropy lifts its effective rank above r."""
    m, n = shape
    return (math.sqrt(m) + math.sqrt(n)) * float(torch.finfo(torch.float32).eps) * \
        max(float(w.abs().max()) for w in weights)


def update_matrix(update: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A conv weight update as [out, in * k^3] (a transposed conv's weight is [in, out, k...])."""
    if transposed:
        update = update.transpose(0, 1)
    return update.reshape(update.shape[0], -1)


def parameter_variation(theta0: dict, models: list[tuple[str, dict]], starts: list[dict]) -> dict:
    """Relative change per layer group against ``theta0`` and effective ranks of each model's update."""
    keys = [k for k in models[0][1] if layer_group(k) is not None]
    missing = [k for k in keys if k not in theta0]
    if missing:
        raise MedSeqFTError(f"The foundation lacks {missing[:2]}: it is not the start of this run's models.")
    groups = list(dict.fromkeys(layer_group(k) for k in keys))
    base_norm = {g: math.sqrt(sum(float(theta0[k].double().pow(2).sum()) for k in keys if layer_group(k) == g))
                 for g in groups}
    rows = []
    for (label, theta), start in zip(models, starts):
        change, step, ranks = {}, {}, []
        for g in groups:
            gk = [k for k in keys if layer_group(k) == g]
            d0 = math.sqrt(sum(float((theta[k].double() - theta0[k].double()).pow(2).sum()) for k in gk))
            ds = math.sqrt(sum(float((theta[k].double() - start[k].double()).pow(2).sum()) for k in gk))
            change[g] = d0 / base_norm[g] if base_norm[g] else None
            step[g] = ds / base_norm[g] if base_norm[g] else None
        for k in keys:
            w = theta[k]
            if w.dim() < 3:
                continue
            transposed = layer_group(k).startswith("up")
            u = update_matrix(w.double() - start[k].double(), transposed)
            floor = rounding_floor(u.shape, w, start[k]) if w.dtype == torch.float32 else 0.0
            ranks.append({"layer": k, "group": layer_group(k), "effective_rank": effective_rank(u, floor),
                          "full_rank": min(u.shape), "update_norm": float(u.norm())})
        mean_rank = {g: float(np.mean([r["effective_rank"] for r in ranks if r["group"] == g]))
                     if any(r["group"] == g for r in ranks) else None for g in groups}
        rows.append({"task": label, "relative_change": change, "relative_step": step, "effective_ranks": ranks,
                     "mean_effective_rank": mean_rank})
    return {"groups": groups, "rows": rows}


def params_for_run(run: str, foundation: str | None = None) -> dict:
    from nnunetv2_medseqft.sequence.recipes import get_method

    folder, manifest = read_run(run)
    settings = manifest["settings"]
    foundation = run_foundation(manifest, foundation)
    theta0 = body_of(load_checkpoint_file(foundation, what="foundation")["network_weights"])
    tasks = task_models(manifest)
    models, sections = [], []
    for d, path in tasks:
        ckpt = load_checkpoint_file(path, what=f"task model {d}")
        models.append((d, body_of(ckpt["network_weights"])))
        sections.append(ckpt.get("medseqft") or {})
    check_same_architecture({"foundation": theta0, **{d: s for d, s in models}})
    chained = get_method(settings["method"]).chained
    starts = [models[i - 1][1] if chained and i > 0 else theta0 for i in range(len(models))]
    result = parameter_variation(theta0, models, starts)
    lora_rank = (sections[0].get("rft") or {}).get("lora_rank") if settings["method"] in LORA_METHODS else None
    result.update(run=manifest.get("name"), method=settings["method"], folder=folder, chained=chained,
                  update_of="M_t - M_(t-1)" if chained else "M_t - M0", lora_rank=lora_rank)
    return result


def plot_params(results: list[dict], path: str) -> str:
    from nnunetv2_medseqft.reports.report import _pyplot, _save, _short

    plt = _pyplot()
    n = len(results)
    width = max(6.0, 0.55 * max(len(r["groups"]) for r in results) * 2 + 3)
    fig, axes = plt.subplots(n, 2, figsize=(width, 1.2 + 0.5 * max(len(r["rows"]) for r in results) * n + 0.8 * n),
                             squeeze=False)
    vmax = max((v for r in results for row in r["rows"] for v in row["relative_change"].values() if v is not None),
               default=1.0) or 1.0
    for (ax_c, ax_r), r in zip(axes, results):
        tasks = [_short(row["task"]) for row in r["rows"]]
        for ax, key, title, kwargs in (
                (ax_c, "relative_change", "||theta_t - theta_0|| / ||theta_0||", {"vmin": 0, "vmax": vmax}),
                (ax_r, "mean_effective_rank", f"mean effective rank of {r['update_of']}", {"vmin": 0})):
            grid = np.array([[np.nan if row[key][g] is None else row[key][g] for g in r["groups"]]
                             for row in r["rows"]], dtype=float)
            im = ax.imshow(grid, aspect="auto", cmap="magma", **kwargs)
            ax.set_xticks(range(len(r["groups"])))
            ax.set_xticklabels(r["groups"], rotation=45, ha="right", fontsize="small")
            ax.set_yticks(range(len(tasks)))
            ax.set_yticklabels(tasks, fontsize="small")
            ax.set_title(f"{r['run']} ({r['method']}): {title}", fontsize="small")
            fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def params_for_runs(runs: list[str], out: str | None = None, foundation: str | None = None, log=print) -> dict:
    results = [params_for_run(r, foundation) for r in runs]
    out = os.path.abspath(out or os.path.join(results[0]["folder"], ANALYSIS_FOLDER))
    os.makedirs(out, exist_ok=True)
    summary = {"runs": results, "json": os.path.join(out, "params.json")}
    summary["png"] = plot_params(results, os.path.join(out, "params.png"))
    write_json_atomic(summary, summary["json"])
    for r in results:
        last = r["rows"][-1]
        log(f"{r['run']} ({r['method']}): relative change after {last['task']}: " + ", ".join(
            f"{g} {v:.3f}" for g, v in last["relative_change"].items() if v is not None))
    return summary
