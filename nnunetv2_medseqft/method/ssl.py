"""Masked-image-modelling (MIM) self-supervision: block masks, the reconstruction loss, patch draws.

One place for the SSL objective, shared by the pre-training trainer (which optimises it) and
MDS selection (which scores cases with it): both must compute exactly the same loss, so the
settings travel inside the foundation checkpoint (``SSLSettings.to_dict``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nnunetv2_medseqft.cpu_precision import cpu_autocast
from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.method.settings import JsonSettings


@dataclass(frozen=True)
class SSLSettings(JsonSettings):
    """Masking settings of the SSL objective.

    mask_ratio: fraction of blocks hidden per patch (0.5: half the patch must be inferred from
        the other half, hard enough to need anatomy, easy enough for small 3D patches).
    block_size: edge of a cubic mask block in voxels. 8 voxels hides structures the size of a
        small organ part at typical nnU-Net spacings without blanking whole organs in a 32^3 patch.
    """

    mask_ratio: float = 0.5
    block_size: int = 8
    loss: str = "masked_mse"  # MSE over masked voxels only, averaged over channels and voxels

    def __post_init__(self):
        if not 0.0 < self.mask_ratio < 1.0:
            raise MedSeqFTError(f"SSL mask_ratio must lie in (0, 1), got {self.mask_ratio}.")
        if self.block_size < 1:
            raise MedSeqFTError(f"SSL block_size must be >= 1 voxel, got {self.block_size}.")
        if self.loss != "masked_mse":
            raise MedSeqFTError(f"Unknown SSL loss {self.loss!r}; only 'masked_mse' is implemented.")



def block_mask(shape, settings: SSLSettings, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Random block mask, 1 = hidden, shape (B, 1, *spatial), exactly round(ratio * n_blocks) blocks per sample.

    Drawn on a coarse grid and expanded, so every block is hidden or visible as a whole.
    """
    spatial = tuple(shape[2:])
    return expand_blocks(coarse_block_mask(shape[0], spatial, settings, generator), spatial, settings, device)


def coarse_block_mask(b: int, spatial, settings: SSLSettings, generator: torch.Generator | None = None) -> torch.Tensor:
    """``b`` masks on the block grid (B, 1, *grid): small enough to keep many, expanded by ``expand_blocks``."""
    grid = [int(np.ceil(s / settings.block_size)) for s in spatial]
    n_blocks = int(np.prod(grid))
    n_hidden = min(max(1, int(round(settings.mask_ratio * n_blocks))), n_blocks - 1) if n_blocks > 1 else 1
    scores = torch.rand((b, n_blocks), generator=generator, device=generator.device if generator else "cpu")
    order = scores.argsort(dim=1)
    coarse = torch.zeros((b, n_blocks), dtype=torch.float32, device=order.device)
    coarse.scatter_(1, order[:, :n_hidden], 1.0)
    return coarse.view(b, 1, *grid)


def expand_blocks(coarse: torch.Tensor, spatial, settings: SSLSettings, device: torch.device | str = "cpu"
                  ) -> torch.Tensor:
    for dim in range(len(spatial)):
        coarse = coarse.repeat_interleave(settings.block_size, dim=2 + dim)
    crop = (slice(None), slice(None)) + tuple(slice(0, s) for s in spatial)
    return coarse[crop].to(device)


def mask_input(data: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hidden voxels are set to 0, the mean of nnU-Net's z-scored intensities."""
    return data * (1.0 - mask)


def masked_mse_per_sample(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over hidden voxels (all channels), one value per sample, in float32."""
    err = (prediction.float() - target.float()) ** 2 * mask
    n = mask.sum(dim=tuple(range(1, mask.ndim))) * prediction.shape[1]
    return err.sum(dim=tuple(range(1, err.ndim))) / n.clamp_min(1.0)


def ssl_losses(network: torch.nn.Module, data: torch.Tensor, settings: SSLSettings,
               generator: torch.Generator | None = None, mask: torch.Tensor | None = None,
               cpu_bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample masked reconstruction loss of ``network`` on ``data``, and the loss of predicting 0
    (the yardstick for a reconstruction score). ``mask``: given masks (B, 1, *spatial), else drawn with
    ``generator``. Autocast on CUDA, as nnU-Net trains; on a CPU bf16 autocast where ``cpu_bf16`` (the
    pre-training steps, ``cpu_precision.py``), float32 otherwise (MDS scoring, the final SSL validation)."""
    if mask is None:
        mask = block_mask(data.shape, settings, generator=generator, device=data.device)
    mask = mask.to(data.device)
    amp = torch.autocast(data.device.type, enabled=True) if data.device.type == "cuda" else cpu_autocast(cpu_bf16)
    with amp:
        prediction = network(mask_input(data, mask))
    return masked_mse_per_sample(prediction, data, mask), masked_mse_per_sample(torch.zeros_like(data), data, mask)


def random_patch(data: np.ndarray, patch_size, rng: np.random.Generator) -> np.ndarray:
    """A uniformly placed patch of a (C, *spatial) case; zero-padded (centred) where the case is smaller."""
    data, patch_size = _padded(data, patch_size)
    starts = [int(rng.integers(0, s - p + 1)) for s, p in zip(data.shape[1:], patch_size)]
    return _window(data, starts, patch_size)


def patch_at(data: np.ndarray, patch_size, position) -> np.ndarray:
    """The patch at relative ``position`` (one number in [0, 1) per axis, uniform over the valid starts): the
    same position means the same place in every case, whatever its size (MDS's common draws)."""
    data, patch_size = _padded(data, patch_size)
    starts = [min(int(u * (s - p + 1)), s - p) for u, s, p in zip(position, data.shape[1:], patch_size)]
    return _window(data, starts, patch_size)


def _padded(data: np.ndarray, patch_size) -> tuple[np.ndarray, tuple[int, ...]]:
    patch_size = tuple(int(p) for p in patch_size)
    pad = [max(0, p - s) for p, s in zip(patch_size, data.shape[1:])]
    if any(pad):
        data = np.pad(np.asarray(data), [(0, 0)] + [(q // 2, q - q // 2) for q in pad])
    return data, patch_size


def _window(data: np.ndarray, starts, patch_size) -> np.ndarray:
    window = (slice(None),) + tuple(slice(st, st + p) for st, p in zip(starts, patch_size))
    return np.asarray(data[window], dtype=np.float32)


def build_ssl_network(plans_manager, configuration_manager, num_input_channels: int) -> torch.nn.Module:
    """The plans' network with one reconstruction output per input channel, no deep supervision: the SSL
    network of pre-training (``MedSeqFTPretrainTrainer``) and of MDS scoring."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    return nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                    num_input_channels, False)
