"""Loss landscapes of task models (``medseqft analyze landscape``).

landscape: loss and Dice of a task model along random directions around its weights, filter-normalised as
in Li et al. 2018 ("Visualizing the Loss Landscape of Neural Nets"). For every conv weight (conv,
transposed conv, segmentation head) a seeded Gaussian direction is rescaled per filter, i.e. per output
channel (axis 0 of a Conv3d weight, axis 1 of a ConvTranspose3d weight), so that each filter of the
direction has the norm of the model's filter. Biases and normalisation affines get a zero direction (the
"ignore_biasbn" convention of Li et al.'s code): they are scale parameters whose random perturbation says
little about the minimum's shape. Several models share the axes: the Gaussian draws are made once, from
the shapes of the first model, and each model normalises them by its own filters; models of different
architectures are refused.
  Loss = nnU-Net's segmentation loss (the trainer's Dice + CE with the plans' batch_dice setting, without
  deep supervision); Dice = hard Dice in points on the same voxels, mean over foreground labels (both
  empty: 100). The data are fixed: the centre crop (zero-padded where the case is smaller) of the plans'
  patch size from each of the first N validation cases of the model's fold, read from the preprocessed
  data; label -1 (outside the crop-to-nonzero mask) counts as background, as in nnU-Net's training.
  Sharpness: the loss at radius 0.5 (alpha = +-0.5 in 1D, 8 points on the circle in 2D) minus the loss
  at the centre, also relative to the centre.
"""

from __future__ import annotations

import copy
import math
import os

import numpy as np
import torch

from nnunetv2_medseqft.checkpoints import load_checkpoint_file, sha256_file
from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.jsonio import write_json_atomic
from nnunetv2_medseqft.sequence.run_record import (
    find_task,
    read_run,
    task_checkpoint,
)

RADIUS = 0.5
ANALYSIS_FOLDER = "analysis"


# ---------------------------------------------------------------- architecture checks

def check_same_architecture(states: dict[str, dict]) -> None:
    """Refuse models whose weights do not line up key by key and shape by shape (shared axes need that)."""
    labels = list(states)
    ref_label, ref = labels[0], states[labels[0]]
    for label in labels[1:]:
        state = states[label]
        missing, extra = [k for k in ref if k not in state], [k for k in state if k not in ref]
        shapes = [k for k in ref if k in state and tuple(ref[k].shape) != tuple(state[k].shape)]
        if missing or extra or shapes:
            detail = (f"keys only in {ref_label}: {missing[:2]}" if missing else
                      f"keys only in {label}: {extra[:2]}" if extra else
                      f"{shapes[0]} is {tuple(ref[shapes[0]].shape)} in {ref_label}, "
                      f"{tuple(state[shapes[0]].shape)} in {label}")
            raise MedSeqFTError(f"Models {ref_label} and {label} have different architectures ({detail}). "
                                "Landscapes on shared axes need the same network: compare models of one task "
                                "planned with the same foundation plans.")


# ---------------------------------------------------------------- directions

def _filter_axis(network: torch.nn.Module, name: str) -> int:
    owner = network.get_submodule(name.rpartition(".")[0]) if "." in name else network
    return 1 if isinstance(owner, torch.nn.modules.conv._ConvTransposeNd) else 0


def direction_parameters(network: torch.nn.Module) -> list[str]:
    """Names of the parameters that get a direction: conv weights (dim > 1); biases and norms do not."""
    return [n for n, p in network.named_parameters() if p.dim() > 1]


def random_directions(network: torch.nn.Module, seed: int, count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` raw Gaussian directions over the direction parameters, drawn in parameter order from ``seed``."""
    generator = torch.Generator().manual_seed(int(seed))
    params = dict(network.named_parameters())
    names = direction_parameters(network)
    return [{n: torch.randn(params[n].shape, generator=generator, dtype=torch.float32) for n in names}
            for _ in range(count)]


def filter_normalised(network: torch.nn.Module, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``raw`` rescaled so that every filter (output channel) has the norm of the network's own filter."""
    params = dict(network.named_parameters())
    out = {}
    for name, d in raw.items():
        w = params[name].detach().float().cpu()
        axis = _filter_axis(network, name)
        wf, df = w.movedim(axis, 0).reshape(w.shape[axis], -1), d.movedim(axis, 0).reshape(d.shape[axis], -1)
        scale = wf.norm(dim=1) / (df.norm(dim=1) + 1e-10)
        shape = [1] * d.dim()
        shape[axis] = -1
        out[name] = d * scale.reshape(shape)
    return out


# ---------------------------------------------------------------- loss and Dice on fixed patches

def segmentation_loss(label_manager, batch_dice: bool):
    """The loss nnUNetTrainer._build_loss builds for label (not region) training, without deep supervision."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    if label_manager.has_regions:
        raise MedSeqFTError("Region-based training is not supported by medseqft analyze landscape (use integer "
                            "labels).")
    return DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          weight_ce=1, weight_dice=1, ignore_label=label_manager.ignore_label,
                          dice_class=MemoryEfficientSoftDiceLoss)


def hard_dice(logits: torch.Tensor, target: torch.Tensor, labels) -> float:
    """Dice in points of argmax(logits) against target over all given voxels, mean over ``labels``."""
    pred = logits.argmax(1)
    gt = target[:, 0]
    values = []
    for value in labels:
        p, g = pred == value, gt == value
        denominator = float(p.sum() + g.sum())
        values.append(100.0 if denominator == 0 else 200.0 * float((p & g).sum()) / denominator)
    return float(np.mean(values)) if values else math.nan


class Evaluator:
    """Loss and Dice of a network on one fixed batch of patches (eval mode, no gradients)."""

    def __init__(self, data: torch.Tensor, target: torch.Tensor, loss_fn, labels, device: str = "cpu"):
        self.data, self.target = data.to(device), target.to(device)
        self.loss_fn, self.labels, self.device = loss_fn, list(labels), device

    @torch.no_grad()
    def __call__(self, network: torch.nn.Module) -> tuple[float, float]:
        network.eval()
        logits = network(self.data)
        if isinstance(logits, (list, tuple)):
            logits = logits[0]
        return float(self.loss_fn(logits, self.target)), hard_dice(logits, self.target, self.labels)


def centre_crop(array: np.ndarray, patch_size, pad_value=0) -> np.ndarray:
    """The centred patch of ``array`` (C, X, Y, Z); axes smaller than the patch are padded on both sides."""
    out = array
    for axis, size in enumerate(patch_size, start=1):
        n = out.shape[axis]
        if n > size:
            start = (n - size) // 2
            out = np.take(out, range(start, start + size), axis=axis)
        elif n < size:
            before = (size - n) // 2
            widths = [(0, 0)] * out.ndim
            widths[axis] = (before, size - n - before)
            out = np.pad(out, widths, constant_values=pad_value)
    return out


def validation_patches(init_args: dict, n_cases: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(data [N, C, *patch], target [N, 1, *patch], case ids): centre crops of the first N validation cases of
    the checkpoint's fold, from its plans' preprocessed data."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_medseqft.paths import fold_split, preprocessed_root

    pm = PlansManager(copy.deepcopy(init_args["plans"]))
    cm = pm.get_configuration(init_args["configuration"])
    folder = os.path.join(preprocessed_root(), pm.dataset_name)
    data_folder = os.path.join(folder, cm.data_identifier)
    if not os.path.isdir(data_folder):
        raise MedSeqFTError(f"No preprocessed data {data_folder}: plan and preprocess {pm.dataset_name} with these "
                            "plans first (medseqft plan / medseqft run).")
    _, val = fold_split(folder, data_folder, init_args["fold"], log=lambda *a: None)
    if n_cases < 1:
        raise MedSeqFTError("--cases must be at least 1.")
    keys = list(val)[:n_cases]
    dataset = infer_dataset_class(data_folder)(data_folder, identifiers=keys)
    data, target = [], []
    for key in keys:
        d, s, _, _ = dataset.load_case(key)
        data.append(centre_crop(np.asarray(d, dtype=np.float32), cm.patch_size))
        seg = centre_crop(np.asarray(s), cm.patch_size)
        target.append(np.where(seg < 0, 0, seg).astype(np.int16))
    return torch.from_numpy(np.stack(data)), torch.from_numpy(np.stack(target)).float(), keys


# ---------------------------------------------------------------- landscape

def grid_values(n: int) -> list[float]:
    """n points in [-1, 1]; the centre is exactly 0 when n is odd (so it is the model's own weights)."""
    if n < 2:
        raise MedSeqFTError("--grid needs at least 2 points (an odd number puts the model itself on the grid).")
    values = np.linspace(-1.0, 1.0, n)
    values[np.isclose(values, 0.0, atol=1e-12)] = 0.0
    return [float(v) for v in values]


class _Perturbed:
    """Sets the network's direction parameters to w + a d1 (+ b d2) in place; restores w on exit."""

    def __init__(self, network: torch.nn.Module, directions: list[dict[str, torch.Tensor]]):
        self.network, self.directions = network, directions
        params = dict(network.named_parameters())
        self.params = {n: params[n] for n in directions[0]}
        self.origin = {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def set(self, *coefficients: float) -> None:
        for name, p in self.params.items():
            value = self.origin[name].clone()
            for c, d in zip(coefficients, self.directions):
                if c != 0.0:
                    value += c * d[name].to(value.device, value.dtype)
            p.copy_(value)

    def restore(self) -> None:
        self.set(*[0.0] * len(self.directions))


def landscape(networks: dict[str, torch.nn.Module], evaluator: Evaluator, grid: int = 11, two_d: bool = False,
              seed: int = 0, log=lambda *a: None) -> dict:
    """Loss/Dice grids of every network along shared filter-normalised random directions."""
    if not networks:
        raise MedSeqFTError("No model given for the landscape.")
    check_same_architecture({label: net.state_dict() for label, net in networks.items()})
    first = next(iter(networks.values()))
    raw = random_directions(first, seed, 2 if two_d else 1)
    alphas = grid_values(grid)
    circle = [(RADIUS * math.cos(k * math.pi / 4), RADIUS * math.sin(k * math.pi / 4)) for k in range(8)]
    results = {}
    for label, net in networks.items():
        directions = [filter_normalised(net, d) for d in raw]
        perturbed = _Perturbed(net, directions)
        try:
            centre_loss, centre_dice = evaluator(net)
            loss, dice = [], []
            if two_d:
                for b in alphas:
                    row_l, row_d = [], []
                    for a in alphas:
                        perturbed.set(a, b)
                        lv, dv = evaluator(net)
                        row_l.append(lv)
                        row_d.append(dv)
                    loss.append(row_l)
                    dice.append(row_d)
                    log(f"  {label}: row beta={b:+.2f} done")
                ring = []
                for a, b in circle:
                    perturbed.set(a, b)
                    ring.append(evaluator(net)[0])
            else:
                for a in alphas:
                    perturbed.set(a)
                    lv, dv = evaluator(net)
                    loss.append(lv)
                    dice.append(dv)
                ring = []
                for a in (-RADIUS, RADIUS):
                    perturbed.set(a)
                    ring.append(evaluator(net)[0])
        finally:
            perturbed.restore()
        rise = float(np.mean(ring)) - centre_loss
        results[label] = {"centre": {"loss": centre_loss, "dice": centre_dice}, "loss": loss, "dice": dice,
                          "sharpness": {"radius": RADIUS, "loss_at_radius": float(np.mean(ring)),
                                        "loss_rise": rise,
                                        "relative_rise": rise / centre_loss if centre_loss else None}}
        log(f"  {label}: centre loss {centre_loss:.4f}, Dice {centre_dice:.1f}; loss rise at r={RADIUS}: {rise:+.4f}")
    return {"alphas": alphas, "betas": alphas if two_d else None, "two_d": two_d, "seed": seed, "models": results}


def plot_landscape(result: dict, path: str, title: str) -> str:
    from nnunetv2_medseqft.reports.report import _pyplot, _save

    plt = _pyplot()
    models = result["models"]
    alphas = result["alphas"]
    if not result["two_d"]:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for label, r in models.items():
            axes[0].plot(alphas, r["loss"], marker="o", ms=3, label=label)
            axes[1].plot(alphas, r["dice"], marker="o", ms=3, label=label)
        axes[0].set_ylabel("loss (Dice + CE)")
        axes[1].set_ylabel("Dice (points)")
        for ax in axes:
            ax.set_xlabel("alpha (filter-normalised direction)")
            ax.axvline(0, color="grey", lw=0.5)
        axes[0].legend(fontsize="small")
    else:
        n = len(models)
        fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 4), squeeze=False)
        values = [v for r in models.values() for row in r["loss"] for v in row]
        levels = np.linspace(min(values), max(values), 15) if max(values) > min(values) else 15
        for ax, (label, r) in zip(axes[0], models.items()):
            cs = ax.contour(alphas, result["betas"], np.asarray(r["loss"]), levels=levels, cmap="viridis")
            ax.clabel(cs, fontsize=6, fmt="%.2f")
            ax.plot(0, 0, "r+")
            ax.set_title(label, fontsize="small")
            ax.set_xlabel("alpha")
            ax.set_ylabel("beta")
            ax.set_aspect("equal")
    fig.suptitle(title, fontsize="small")
    return _save(fig, path)


# ---------------------------------------------------------------- runs and their models

def network_from_checkpoint(ckpt: dict, device: str = "cpu") -> torch.nn.Module:
    from nnunetv2_medseqft.checkpoints import build_task_network

    net = build_task_network(ckpt["init_args"])
    net.load_state_dict(ckpt["network_weights"])
    net.decoder.deep_supervision = False
    return net.to(device).eval()


def landscape_for_runs(runs: list[str], task: str, models=("M",), grid: int = 11, two_d: bool = False,
                       cases: int = 2, seed: int = 0, out: str | None = None, device: str = "cpu",
                       log=print) -> dict:
    """Landscapes of the task's models of each run, on shared axes; writes PNG + JSON, returns the JSON."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager


    if not runs:
        raise MedSeqFTError("Give at least one --run.")
    entries, dataset = [], None
    for run in runs:
        folder, manifest = read_run(run)
        dataset_name = find_task(manifest, task)
        if dataset and dataset_name != dataset:
            raise MedSeqFTError(f"--task {task} names {dataset} in one run and {dataset_name} in another.")
        dataset = dataset_name
        for which in models:
            entries.append((f"{manifest.get('name')} {which}_t", folder, task_checkpoint(manifest, dataset, which)))
    checkpoints = {label: load_checkpoint_file(path, what=f"model {label}") for label, _, path in entries}
    check_same_architecture({label: c["network_weights"] for label, c in checkpoints.items()})
    first = next(iter(checkpoints.values()))
    init_args = first["init_args"]
    data, target, keys = validation_patches(init_args, cases)
    pm = PlansManager(copy.deepcopy(init_args["plans"]))
    cm = pm.get_configuration(init_args["configuration"])
    lm = pm.get_label_manager(init_args["dataset_json"])
    evaluator = Evaluator(data, target, segmentation_loss(lm, cm.batch_dice), lm.foreground_labels, device)
    networks = {label: network_from_checkpoint(c, device) for label, c in checkpoints.items()}
    log(f"landscape of {dataset} ({'2D' if two_d else '1D'}, grid {grid}, seed {seed}) on {len(keys)} validation "
        f"patches {list(cm.patch_size)}: {', '.join(keys)}")
    result = landscape(networks, evaluator, grid=grid, two_d=two_d, seed=seed, log=log)
    result.update(task=dataset, cases=keys, patch_size=list(cm.patch_size), fold=init_args["fold"],
                  convention="filter-normalised Gaussian directions (Li et al. 2018), per output channel; zero "
                             "direction for biases and normalisation affines (ignore_biasbn)",
                  checkpoints={label: {"path": path, "sha256": sha256_file(path)} for label, _, path in entries})
    out = os.path.abspath(out or os.path.join(entries[0][1], ANALYSIS_FOLDER))
    os.makedirs(out, exist_ok=True)
    stem = f"landscape_{dataset}_{'2d' if two_d else '1d'}"
    result["json"] = os.path.join(out, stem + ".json")
    result["png"] = plot_landscape(result, os.path.join(out, stem + ".png"),
                                   f"{dataset}: loss landscape, {len(keys)} validation patches, seed {seed}")
    write_json_atomic(result, result["json"])
    return result
