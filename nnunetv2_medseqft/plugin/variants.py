"""Trainer variants named the nnU-Net way (``..._5epochs``): a subclass per budget or setting."""

from __future__ import annotations

import torch


def budget_variant(name: str, base: type, module: str, epochs: int, iterations: int | None = None,
                   val_iterations: int | None = None, save_every: int | None = None, **class_attrs) -> type:
    """Subclass of ``base`` with another epoch/iteration budget and optional class attributes.

    The ``__init__`` keeps nnU-Net's exact signature: the base class records it with inspect."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs = epochs
        if iterations is not None:
            self.num_iterations_per_epoch = iterations
        if val_iterations is not None:
            self.num_val_iterations_per_epoch = val_iterations
        if save_every is not None:
            self.save_every = save_every

    return type(name, (base,), {"__init__": __init__, "__module__": module, **class_attrs})


BUDGET_KEYS = {"num_epochs": "num_epochs", "iterations": "num_iterations_per_epoch",
               "val_iterations": "num_val_iterations_per_epoch", "save_every": "save_every",
               "warmup_epochs": "warmup_epochs", "mirroring": "mirroring"}
MIN_BUDGET = {"warmup_epochs": 0, "mirroring": 0}  # every other budget key is >= 1
MAX_BUDGET = {"mirroring": 1}  # 1: nnU-Net's mirroring augmentation (and test-time axes); 0: none


def apply_budget(trainer, budget: dict) -> None:
    """The plans' ``medseqft.budget`` (written by ``medseqft run``): epochs and iterations without a new class name."""
    from nnunetv2_medseqft.errors import MedSeqFTError

    unknown = sorted(set(budget) - set(BUDGET_KEYS))
    if unknown:
        raise MedSeqFTError(f"Unknown keys {unknown} in the plans' medseqft.budget; known: {sorted(BUDGET_KEYS)}.")
    for key, value in budget.items():
        if value is not None:
            if int(value) < MIN_BUDGET.get(key, 1) or int(value) > MAX_BUDGET.get(key, int(value)):
                allowed = "0 or 1" if key in MAX_BUDGET else f">= {MIN_BUDGET.get(key, 1)}"
                raise MedSeqFTError(f"medseqft.budget.{key} must be {allowed}, got {value}.")
            setattr(trainer, BUDGET_KEYS[key], int(value))
    if budget.get("num_epochs") and budget.get("save_every") is None:
        # nnU-Net writes checkpoint_latest.pth every 50 epochs: a short budget would never have one, and an
        # interrupted training would restart instead of continuing. About ten per training, at most every 50.
        trainer.save_every = max(1, min(trainer.save_every, int(budget["num_epochs"]) // 10))


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
