"""MedSeqFTPretrainTrainer: masked-image-modelling pre-training of a foundation model inside nnU-Net.

``nnUNetv2_train POOL 3d_fullres all -tr MedSeqFTPretrainTrainer``. The network is the plans'
network with as many outputs as input channels; its ``seg_layers`` are the reconstruction head,
so stock ``-pretrained_weights`` skips them for segmentation and MDS scoring loads them.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import torch.distributed as dist
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2_medseqft.trainers.steps import backward_and_step

from nnunetv2_medseqft.checkpoints import MedSeqFTCheckpointMixin
from nnunetv2_medseqft.cpu_precision import LOG_LINE, cpu_bf16
from nnunetv2_medseqft.method.foundation import require_3d_configuration
from nnunetv2_medseqft.method.ssl import (
    SSLSettings,
    build_ssl_network,
    masked_mse_per_sample,
    random_patch,
    ssl_losses,
)
from nnunetv2_medseqft.pacing import PacedEpochsMixin
from nnunetv2_medseqft.plugin.variants import budget_variant
from nnunetv2_medseqft.threads import apply_torch_threads

# fixed seed for validation masks and patches: epochs are then compared on the same draws
VALIDATION_SEED = 20251


class MedSeqFTPretrainTrainer(MedSeqFTCheckpointMixin, PacedEpochsMixin, nnUNetTrainer):
    """SSL settings come from the plans' ``medseqft.ssl`` section when present, else SSLSettings defaults."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        require_3d_configuration(plans, configuration, self.__class__.__name__)
        apply_torch_threads()
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False  # one reconstruction output, at full resolution
        self.ssl_settings = SSLSettings.from_dict(plans.get("medseqft", {}).get("ssl", {}))
        self.cpu_bf16 = cpu_bf16(self.device)  # bf16 training and validation steps on a CPU that computes it
        self._val_generator = None

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                   num_output_channels, enable_deep_supervision=True):
        # reconstruct every input channel, whatever the pool's labels are
        return build_ssl_network(plans_manager, configuration_manager, num_input_channels)

    def _build_loss(self):
        return masked_mse_per_sample  # not nnU-Net's Dice+CE: called explicitly in the steps below

    def medseqft_checkpoint_section(self) -> dict:
        return {"role": "foundation", "ssl": self.ssl_settings.to_dict(),
                "num_input_channels": self.num_input_channels, "cpu_bf16": self.cpu_bf16}

    def on_train_start(self):
        super().on_train_start()
        self.print_to_log_file(f"MedSeqFT SSL pre-training: masked-image modelling with {self.ssl_settings}")
        if self.cpu_bf16:
            self.print_to_log_file(LOG_LINE)

    def _ssl_forward(self, data: torch.Tensor, generator=None, final: bool = False):
        # the final SSL validation in float32, as MDS scores the foundation
        return ssl_losses(self.network, data, self.ssl_settings, generator, cpu_bf16=self.cpu_bf16 and not final)

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        per_sample, _ = self._ssl_forward(data)
        loss = per_sample.mean()
        backward_and_step(self, loss)
        return {"loss": loss.detach().cpu().numpy()}

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        self._val_generator = torch.Generator().manual_seed(VALIDATION_SEED)

    def validation_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        per_sample, baseline = self._ssl_forward(data, generator=self._val_generator)
        return {"loss": per_sample.mean().item(), "baseline": baseline.mean().item()}

    def on_validation_epoch_end(self, val_outputs: list[dict]):
        loss = float(np.mean([o["loss"] for o in val_outputs]))
        baseline = float(np.mean([o["baseline"] for o in val_outputs]))
        if self.is_ddp:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (loss, baseline))
            loss, baseline = (float(np.mean(v)) for v in zip(*gathered))
        # Dice means nothing here. nnU-Net's logger, progress.png and best-checkpoint choice read
        # 'mean_fg_dice', so it receives the reconstruction score 1 - MSE / MSE(predict 0): 1 is perfect.
        score = 1.0 - loss / max(baseline, 1e-8)
        self.logger.log("val_losses", loss, self.current_epoch)
        self.logger.log("mean_fg_dice", score, self.current_epoch)
        self.logger.log("dice_per_class_or_region", [score], self.current_epoch)

    def on_epoch_end(self):
        self.print_to_log_file("reconstruction score (1 - MSE/MSE0; shown as 'Pseudo dice' below)",
                               np.round(self.logger.get_value("mean_fg_dice", step=-1), 4))
        super().on_epoch_end()

    def perform_actual_validation(self, save_probabilities: bool = False):
        """Masked reconstruction loss of every validation case (fixed seeds), in validation/ssl_validation.json."""
        if self.local_rank != 0:
            return
        self.network.eval()
        _, val_keys = self.do_split()
        dataset = self.dataset_class(self.preprocessed_dataset_folder, val_keys)
        patch = self.configuration_manager.patch_size
        per_case = {}
        with torch.no_grad():
            for i, key in enumerate(sorted(val_keys)):
                rng = np.random.default_rng(VALIDATION_SEED + i)
                data = torch.from_numpy(random_patch(dataset.load_case(key)[0], patch, rng))[None].to(self.device)
                gen = torch.Generator().manual_seed(VALIDATION_SEED + i)
                loss, baseline = self._ssl_forward(data, generator=gen, final=True)
                per_case[key] = {"masked_mse": loss.item(), "score": 1.0 - loss.item() / max(baseline.item(), 1e-8)}
        summary = {
            "ssl": self.ssl_settings.to_dict(),
            "mean_masked_mse": float(np.mean([v["masked_mse"] for v in per_case.values()])),
            "mean_score": float(np.mean([v["score"] for v in per_case.values()])),
            "cases": per_case,
        }
        out = os.path.join(self.output_folder, "validation")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "ssl_validation.json"), "w") as f:
            json.dump(summary, f, indent=2)
        self.print_to_log_file(f"SSL validation on {len(per_case)} cases: masked MSE "
                               f"{summary['mean_masked_mse']:.4f}, reconstruction score {summary['mean_score']:.4f}")


MedSeqFTPretrainTrainer_5epochs = budget_variant("MedSeqFTPretrainTrainer_5epochs", MedSeqFTPretrainTrainer, __name__, 5)
MedSeqFTPretrainTrainer_50epochs = budget_variant("MedSeqFTPretrainTrainer_50epochs", MedSeqFTPretrainTrainer, __name__, 50)
MedSeqFTPretrainTrainer_250epochs = budget_variant("MedSeqFTPretrainTrainer_250epochs", MedSeqFTPretrainTrainer, __name__, 250)
# the CPU benchmark scale (MedSeqFTCPUPlans): EPOCHS x 50 iterations, 10 validation batches
MedSeqFTPretrainTrainer_cpu = budget_variant("MedSeqFTPretrainTrainer_cpu", MedSeqFTPretrainTrainer, __name__,
                                             60, 50, 10)
# medseqft demo: 8 of those epochs
MedSeqFTPretrainTrainer_cpuDemo = budget_variant("MedSeqFTPretrainTrainer_cpuDemo", MedSeqFTPretrainTrainer, __name__,
                                                 8, 50, 10)
# CPU tests: 6 epochs of 10 iterations, 3 validation batches
MedSeqFTPretrainTrainer_tiny = budget_variant("MedSeqFTPretrainTrainer_tiny", MedSeqFTPretrainTrainer, __name__,
                                              6, 10, 3)
