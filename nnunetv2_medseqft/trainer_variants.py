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
