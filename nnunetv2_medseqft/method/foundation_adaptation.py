"""A foundation adapted to a task's input channels: another channel count, or the foundation's normalisation on
channels whose names ask for another (``medseqft adapt-foundation``).

The result is a foundation like any other (``load_foundation`` accepts it; ``medseqft plan``, ``select``, ``run`` and
the stock trainers use it unchanged), made once per channel layout and recording what it was made from, so every
plans file and run made with it records the adaptation too (``Foundation.provenance``).

Channel adaptation ``replicate`` (replicate-and-scale): every task channel gets the foundation's input kernel summed
over the foundation's channels, divided by the task's channel count, so that identical images on all task channels
give exactly the foundation's stem response; the reconstruction head (MDS's output) gives each task channel the mean
of the foundation's reconstruction outputs. Every task channel inherits the foundation channel's preprocessing
(normalisation scheme, mask, intensity statistics); for that, a foundation whose channels normalise differently is
refused when the count changes.
"""

from __future__ import annotations

import copy
import os
from typing import TYPE_CHECKING

from nnunetv2_medseqft.errors import MedSeqFTError

if TYPE_CHECKING:  # torch and nnU-Net load only when an adaptation runs (the CLI imports the choices)
    from nnunetv2_medseqft.method.foundation import Foundation

CHANNEL_ADAPTATIONS = ("replicate",)
NORMALIZATIONS = ("check", "foundation")  # check: refuse a modality mismatch; foundation: use the foundation's


def adapted_weights(old: dict, new: dict, channels_from: int, channels_to: int) -> dict:
    """``new``'s keys filled from ``old``: equal shapes copied, the input convolution replicated and scaled, the
    reconstruction head averaged; any other difference is an error (the networks are not the same otherwise)."""
    from nnunetv2_medseqft.checkpoints import is_head_key

    out = {}
    for key, target in new.items():
        src = old[key]
        if src.shape == target.shape:
            out[key] = src.clone()
        elif src.ndim == 5 and src.shape[1] == channels_from and target.shape[1] == channels_to \
                and src.shape[0] == target.shape[0]:
            out[key] = (src.sum(dim=1, keepdim=True) / channels_to).repeat(1, channels_to, 1, 1, 1)
        elif is_head_key(key) and src.shape[0] == channels_from and target.shape[0] == channels_to \
                and src.shape[1:] == target.shape[1:]:
            out[key] = src.mean(dim=0, keepdim=True).repeat(channels_to, *[1] * (src.ndim - 1))
        else:
            raise MedSeqFTError(f"Cannot adapt {key}: {tuple(src.shape)} -> {tuple(target.shape)}.")
    return out


def adapt_foundation(foundation: "Foundation", dataset_json: dict, dataset_name: str, out: str,
                     channels: str | None = None, normalization: str = "check") -> str:
    """Write the foundation adapted to ``dataset_json``'s channels to ``out`` (never replaced); returns ``out``."""
    from nnunetv2.preprocessing.normalization.map_channel_name_to_normalization import get_normalization_scheme
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_medseqft.checkpoints import atomic_torch_save
    from nnunetv2_medseqft.method.foundation import channel_names
    from nnunetv2_medseqft.method.ssl import build_ssl_network

    if channels is not None and channels not in CHANNEL_ADAPTATIONS:
        raise MedSeqFTError(f"Unknown channel adaptation {channels!r}; known: {', '.join(CHANNEL_ADAPTATIONS)}.")
    if normalization not in NORMALIZATIONS:
        raise MedSeqFTError(f"Unknown normalization {normalization!r}; known: {', '.join(NORMALIZATIONS)}.")
    if os.path.exists(out):
        raise MedSeqFTError(f"{out} exists: an adapted foundation is never overwritten (plans and runs made with it "
                            f"record its sha256). Choose another output folder.")
    by_index = channel_names(dataset_json)
    names, c_from = [by_index[k] for k in sorted(by_index, key=int)], foundation.num_input_channels
    c_to = len(names)
    plans = copy.deepcopy(foundation.plans)
    cfg = plans["configurations"][foundation.configuration]
    schemes = list(cfg["normalization_schemes"])
    if c_to != c_from:
        if channels is None:
            raise MedSeqFTError(f"{dataset_name} has {c_to} input channel(s) {names}, the foundation {c_from}: give "
                                f"--channels replicate to adapt its input convolution.")
        if len(set(schemes)) != 1:
            raise MedSeqFTError(f"The foundation's channels normalise differently ({schemes}): which one a task "
                                f"channel inherits is undefined. Adapt only foundations with one scheme.")
    inherited = schemes if c_to == c_from else [schemes[0]] * c_to
    mismatched = [f"{c} '{n}' ({get_normalization_scheme(n).__name__}, foundation: {s})"
                  for c, (n, s) in enumerate(zip(names, inherited)) if get_normalization_scheme(n).__name__ != s]
    if mismatched and normalization != "foundation":
        raise MedSeqFTError(f"Channels of {dataset_name} ask for another normalisation than the foundation's: "
                            f"{'; '.join(mismatched)}. If the foundation's preprocessing is meant for them (e.g. "
                            f"nnssl fine-tuning z-scores every modality), give --normalization foundation.")
    if c_to == c_from and not mismatched:
        raise MedSeqFTError(f"{dataset_name} already fits the foundation (same channels and normalisation): use "
                            f"{foundation.path} as it is.")
    recount = c_to != c_from  # each task channel inherits the foundation's channel 0
    for config in plans["configurations"].values():  # every configuration that states per-channel preprocessing
        if "normalization_schemes" in config:
            config["normalization_schemes"] = list(inherited)
        if "use_mask_for_norm" in config:
            masks = list(config["use_mask_for_norm"])
            config["use_mask_for_norm"] = [masks[0]] * c_to if recount else masks
    props = plans.get("foreground_intensity_properties_per_channel") or {}
    if props and recount:
        plans["foreground_intensity_properties_per_channel"] = {str(c): dict(props["0"]) for c in range(c_to)}
    dataset = dict(copy.deepcopy(foundation.dataset_json), channel_names={str(c): n for c, n in enumerate(names)})
    dataset.pop("modality", None)

    pm = PlansManager(copy.deepcopy(plans))
    new = build_ssl_network(pm, pm.get_configuration(foundation.configuration), c_to).state_dict()
    weights = adapted_weights(foundation.checkpoint["network_weights"], new, c_from, c_to)
    section = dict(foundation.checkpoint["medseqft"], num_input_channels=c_to, adapted_from={
        "path": foundation.path, "sha256": foundation.sha256, "channels": c_from, "dataset": dataset_name,
        "channel_adaptation": channels if recount else None, "normalization": normalization})
    ckpt = dict(foundation.checkpoint, network_weights=weights, optimizer_state=None, medseqft=section,
                init_args=dict(foundation.checkpoint["init_args"], plans=plans, dataset_json=dataset))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_torch_save(ckpt, out)
    return out

