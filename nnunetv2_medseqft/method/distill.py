"""Feature-level distillation: taps on encoder/decoder stage outputs and a per-layer normalised distance."""

from __future__ import annotations

import re

import torch

from nnunetv2_medseqft.checkpoints import unwrap

STAGE_MODULE = re.compile(r"(?:^|\.)(encoder|decoder)\.stages\.(\d+)$")


def stage_modules(network: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """``encoder.stages.i`` and ``decoder.stages.i`` of an nnU-Net U-Net (also inside peft/DDP/compile wrappers)."""
    found, seen = {}, set()
    for name, module in unwrap(network).named_modules():
        m = STAGE_MODULE.search(name)
        if m and id(module) not in seen:
            seen.add(id(module))
            found[f"{m.group(1)}.stages.{m.group(2)}"] = module
    if not found:
        raise ValueError("no encoder/decoder stage modules found: not an nnU-Net U-Net")
    return found


class FeatureTaps:
    """Forward hooks recording stage outputs in a fixed layer order; ``collect()`` returns and clears them.
    ``part``: 'encoder' or 'decoder' taps only that half (None: both)."""

    def __init__(self, network: torch.nn.Module, part: str | None = None):
        modules = stage_modules(network)
        self.names = sorted(n for n in modules if part is None or n.startswith(f"{part}."))
        self._outputs: dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name):
        def hook(_module, _inputs, output):
            self._outputs[name] = output
        return hook

    def collect(self) -> list[torch.Tensor]:
        feats = [self._outputs[n] for n in self.names]
        self._outputs = {}
        return feats

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def feature_distance(student: list[torch.Tensor], teacher: list[torch.Tensor], eps: float = 1e-6) -> torch.Tensor:
    """Mean over layers of MSE(student, teacher) / mean(teacher^2): every layer weighs the same, whatever its scale.

    Zero exactly when the features agree. The sums of squares accumulate in float32 (AMP-safe) inside the
    reduction, without float32 copies of the full-resolution features (under AMP those copies cost more memory
    traffic than the distance itself)."""
    terms = []
    for s, t in zip(student, teacher):
        sq_diff = torch.linalg.vector_norm(s - t, dtype=torch.float32) ** 2
        sq_teacher = torch.linalg.vector_norm(t, dtype=torch.float32) ** 2
        terms.append(sq_diff / (sq_teacher + eps * t.numel()))
    return torch.stack(terms).mean()
