"""nnU-Net's sliding-window prediction with several tiles per forward on CPU.

PyTorch runs a single-sample CPU 3D convolution with its im2col kernel (``Slow3d``) whenever
batch x channels x the first two spatial sizes is below 20480 (``ConvParams::use_mkldnn``, a heuristic made
for 2D), and with oneDNN from two samples up. The CPU scale's first stage (8 features, 32^3 tiles) falls under
it: nnU-Net's one-tile forwards cost ~4x more per tile than a batch of two or more
(``benchmarks/bench_eval.py``). Tiles, Gaussian weights, half-precision accumulation and their order are
nnU-Net's; only the grouping of the forwards differs, so logits agree to float rounding. On GPU tiles stay one
at a time (nnU-Net's memory footprint).
"""

from __future__ import annotations

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian

CPU_TILE_BATCH = 4  # 2 already takes oneDNN's path; 4 keeps a 32^3-patch forward well inside the caches' reach


class TileBatchPredictor(nnUNetPredictor):
    """``nnUNetPredictor`` whose sliding window forwards ``tile_batch`` tiles at once (default: 4 on CPU, else 1)."""

    def __init__(self, *args, tile_batch: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.tile_batch = tile_batch or (CPU_TILE_BATCH if self.device.type == "cpu" else 1)

    @torch.inference_mode()
    def _internal_predict_sliding_window_return_logits(self, data: torch.Tensor, slicers, do_on_device: bool = True):
        results_device = self.device if do_on_device else torch.device("cpu")
        data = data.to(results_device)
        logits = torch.zeros((self.label_manager.num_segmentation_heads, *data.shape[1:]), dtype=torch.half,
                             device=results_device)
        n_predictions = torch.zeros(data.shape[1:], dtype=torch.half, device=results_device)
        gaussian = compute_gaussian(tuple(self.configuration_manager.patch_size), sigma_scale=1. / 8,
                                    value_scaling_factor=10, device=results_device) if self.use_gaussian else 1
        for start in range(0, len(slicers), self.tile_batch):
            group = slicers[start:start + self.tile_batch]
            tiles = torch.stack([data[s] for s in group]).to(self.device)
            predictions = self._internal_maybe_mirror_and_predict(tiles).to(results_device)
            for prediction, s in zip(predictions, group):
                if self.use_gaussian:
                    prediction *= gaussian
                logits[s] += prediction
                n_predictions[s[1:]] += gaussian
        torch.div(logits, n_predictions, out=logits)
        if torch.any(torch.isinf(logits)):
            raise RuntimeError("Encountered inf in predicted array (nnU-Net's half-precision accumulator).")
        return logits
