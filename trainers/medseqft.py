"""MedSeqFT task-step trainers.

``nnUNetv2_train D 3d_fullres FOLD -tr MedSeqFTTrainer -p MedSeqFTPlans -pretrained_weights PREV``:
  stage A (FFT): every parameter trained from M_{t-1} -> F_t, saved as ``checkpoint_fft.pth``;
  stage B (K&G RFT): student = M_{t-1} frozen + peft LoRA on every stage conv, norms and head
    trainable (head from F_t); loss = seg + lambda_k * d(student, F_t) on the batch
    + lambda_g * d(student, M_{t-1}) on the MDS-buffer samples of the batch;
  merge: ``checkpoint_final.pth`` holds M_t as a plain nnU-Net network; ``adapter/`` the peft adapter.
Every checkpoint is a plain network (LoRA merged on the fly), so stock nnUNetv2_predict works with
any of them; stage-B checkpoints also carry the trainable student state for ``--c``.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from torch import autocast
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunetv2_medseqft import lora
from nnunetv2_medseqft.checkpointing import (
    MedSeqFTCheckpointMixin,
    atomic_torch_save,
    load_checkpoint_file,
    unwrap,
)
from nnunetv2_medseqft.distill import FeatureTaps, feature_distance
from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.mds_settings import MDSSettings
from nnunetv2_medseqft.plans_checks import require_3d_configuration
from nnunetv2_medseqft.previous_model import check_previous_model, previous_model_path, state_fingerprint
from nnunetv2_medseqft.rft_settings import RFTSettings
from nnunetv2_medseqft.train_steps import backward_and_step
from nnunetv2_medseqft.trainer_variants import apply_budget, budget_variant, seed_everything

PREVIOUS_MODEL_FILE = "previous_model.pth"  # M_{t-1} as loaded (fresh head): teacher + LoRA base, also on --c
FFT_CHECKPOINT_FILE = "checkpoint_fft.pth"  # F_t
ADAPTER_FOLDER = "adapter"
LOSS_KEYS = ("medseqft_seg", "medseqft_k", "medseqft_g")


class MedSeqFTTrainer(MedSeqFTCheckpointMixin, nnUNetTrainer):
    run_stage_a = True
    run_stage_b = True
    distill = True
    rft_overrides: dict = {}  # trainer-name variants (nnU-Net's way to vary settings)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        require_3d_configuration(plans, configuration, self.__class__.__name__)
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp and not torch.cuda.is_available():  # a gloo process group on CPUs (tests, CPU clusters)
            self.device, self.grad_scaler = torch.device("cpu"), None
        section = plans.get("medseqft", {})
        self.rft = RFTSettings.from_dict({**section.get("rft", {}), **self.rft_overrides})
        self.mds = MDSSettings.from_dict(section.get("mds", {}))
        apply_budget(self, section.get("budget") or {})
        if section.get("seed") is not None:  # head init and the main process' sampling; DA workers draw their own
            seed_everything(int(section["seed"]))
        self.stage = "A" if self.run_stage_a else "B"
        self.previous = None  # provenance of M_{t-1}
        self.buffer_keys: list[str] = []
        self.teacher_fft = self.teacher_prev = self.student = None
        self.fft_provenance = None  # a given F_t (stage-B-only trainer)
        self._taps = {}
        self._init_fingerprint = None

    # ------------------------------------------------------------------ schedule
    @property
    def stage_a_epochs(self) -> int:
        if not self.run_stage_b:
            return self.num_epochs
        return 0 if not self.run_stage_a else int(round(self.num_epochs * (1 - self.rft.stage_b_fraction)))

    def _do_i_compile(self):
        if super()._do_i_compile():
            self.print_to_log_file("torch.compile is off for MedSeqFT task trainers: the network is rebuilt "
                                   "(LoRA student, teachers) between stages, which discards a compiled graph. "
                                   "Compiling works with LoRA and hooks (benchmarks/gpu_check.py).")
        return False

    def initialize(self):
        # nnU-Net wraps DDP for CUDA only; wrap here instead (also on CPU), the same way as the stage-B student
        ddp, self.is_ddp = self.is_ddp, False
        try:
            super().initialize()
        finally:
            self.is_ddp = ddp
        if ddp:  # what nnU-Net's initialize does differently under DDP
            self._set_batch_size_and_oversample()  # per-rank batch
            self.loss = self._build_loss()  # DDP-aware Dice, no zero-weight (= unused) deep-supervision output
            self.network = self._wrap_ddp(self.network)
        self._init_fingerprint = state_fingerprint(unwrap(self.network).state_dict())
        path = previous_model_path(self.plans_manager.plans)
        if path:
            self.previous = check_previous_model(path, self.plans_manager.plans, self.configuration_name,
                                                 self.__class__.__name__)

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        if self.current_epoch == 0:  # a fresh start (not --c): check and keep M_(t-1) before anything slow
            self._record_previous_model()
        self._select_buffer()  # before the loaders exist: stage-B loaders over-sample the buffer
        super().on_train_start()
        for key in LOSS_KEYS:
            self.logger.local_logger.my_fantastic_logging.setdefault(key, [])
        if self.stage == "B" and self.student is None:  # LoRA-only trainer: stage B from the first epoch
            self._enter_stage_b(restart_loaders=False)

    def _record_previous_model(self):
        state = unwrap(self.network).state_dict()
        if state_fingerprint(state) == self._init_fingerprint:
            raise MedSeqFTError(
                f"{self.__class__.__name__} starts from the previous-stage model M_(t-1): pass it with "
                f"-pretrained_weights PATH/checkpoint_final.pth (for the first task the foundation itself, "
                f"written by MedSeqFTPretrainTrainer).")
        if self.local_rank == 0:
            os.makedirs(self.output_folder, exist_ok=True)
            atomic_torch_save({"network_weights": state, "provenance": self.previous,
                               "fingerprint": state_fingerprint(state)},
                              os.path.join(self.output_folder, PREVIOUS_MODEL_FILE))
        self._barrier()

    def _select_buffer(self):
        if not self.run_stage_b:
            return
        tr_keys, _ = self.do_split()
        k = self.mds.buffer_size(len(tr_keys))
        if self.rft.buffer == "random":
            rng = np.random.default_rng(self.mds.seed)
            self.buffer_keys = sorted(rng.choice(sorted(tr_keys), size=k, replace=False).tolist())
            self.buffer_record = {"mode": "random", "buffer": self.buffer_keys}
        else:
            from nnunetv2_medseqft.mds import select_buffer

            if self.local_rank != 0:  # rank 0 scores and writes the buffer file; the others reuse it
                self._barrier()
            record = select_buffer(self.plans_manager.dataset_name, self.fold, self.plans_manager.plans_name,
                                   self.configuration_name, device=self.device, progress=False,
                                   log=self.print_to_log_file)
            if self.local_rank == 0:
                self._barrier()
            self.buffer_keys = list(record["buffer"])
            self.buffer_record = {"mode": "mds", "buffer": self.buffer_keys, "key": record.get("key")}
        self.print_to_log_file(f"MedSeqFT buffer ({self.rft.buffer}, K={len(self.buffer_keys)}): {self.buffer_keys}")

    def on_epoch_start(self):
        if self.stage == "A" and self.current_epoch >= self.stage_a_epochs:
            self._enter_stage_b()
        super().on_epoch_start()

    def on_train_epoch_start(self):
        self.network.train()
        offset = self.stage_a_epochs if self.stage == "B" else 0
        self.lr_scheduler.step(self.current_epoch - offset)
        self.print_to_log_file("")
        self.print_to_log_file(f"Epoch {self.current_epoch} (MedSeqFT stage {self.stage})")
        self.print_to_log_file(f"Current learning rate: {np.round(self.optimizer.param_groups[0]['lr'], decimals=5)}")
        self.logger.log("lrs", self.optimizer.param_groups[0]["lr"], self.current_epoch)

    # ------------------------------------------------------------------ stage B
    def _fresh_network(self, state_dict: dict) -> torch.nn.Module:
        net = self.build_network_architecture(self.plans_manager, self.configuration_manager, self.num_input_channels,
                                              self.label_manager.num_segmentation_heads, self.enable_deep_supervision)
        net.load_state_dict(state_dict)
        return net.to(self.device)

    def _barrier(self):
        if self.is_ddp:
            torch.distributed.barrier()

    def _wrap_ddp(self, net: torch.nn.Module) -> torch.nn.Module:
        if self.device.type == "cuda":
            return DDP(torch.nn.SyncBatchNorm.convert_sync_batchnorm(net), device_ids=[self.local_rank])
        return DDP(net)

    def _frozen(self, net: torch.nn.Module) -> torch.nn.Module:
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        return net

    def _enter_stage_b(self, student_state: dict | None = None, restart_loaders: bool = True):
        """Build F_t / M_{t-1} teachers, the LoRA student, its optimizer and buffer-weighted loaders."""
        previous = torch.load(os.path.join(self.output_folder, PREVIOUS_MODEL_FILE), map_location="cpu",
                              weights_only=False)["network_weights"]
        if self.run_stage_a:
            fft_path = os.path.join(self.output_folder, FFT_CHECKPOINT_FILE)
            if student_state is None:  # leaving stage A now: F_t is the current network
                self.save_checkpoint(fft_path)
                self.print_to_log_file(f"Stage A done: F_t saved as {fft_path}")
                self._barrier()
        else:
            fft_path = self.plans_manager.plans.get("medseqft", {}).get("fft_model") if self.distill else None
            if self.distill and not fft_path:
                raise MedSeqFTError(
                    f"{self.__class__.__name__} runs stage B only and needs F_t: set \"fft_model\": "
                    f"\"PATH/checkpoint_fft.pth\" in the plans' medseqft section (or use MedSeqFTTrainer).")
            if fft_path:
                self.fft_provenance = check_previous_model(fft_path, self.plans_manager.plans,
                                                           self.configuration_name, self.__class__.__name__,
                                                           what="medseqft.fft_model")
        if fft_path:
            fft_state = load_checkpoint_file(fft_path, what="F_t checkpoint")["network_weights"]
            self.teacher_fft = self._frozen(self._fresh_network(fft_state))
            head = {k: v for k, v in fft_state.items() if ".seg_layers." in k}
        else:
            head = {}
        self.teacher_prev = self._frozen(self._fresh_network(previous))
        base = self._fresh_network({**previous, **head})
        student = lora.add_lora(base, self.rft.lora_rank, self.rft.lora_alpha, self.rft.lora_targets)
        if student_state is not None:
            student.load_state_dict(student_state, strict=False)
        self.student = student
        self.network = self._wrap_ddp(student) if self.is_ddp else student
        self.stage = "B"
        self.optimizer, self.lr_scheduler = self.configure_optimizers()
        self._taps = {"student": FeatureTaps(student), "prev": FeatureTaps(self.teacher_prev)}
        if self.teacher_fft is not None:
            self._taps["fft"] = FeatureTaps(self.teacher_fft)
        self.set_deep_supervision_enabled(self.enable_deep_supervision)
        if restart_loaders:
            self._restart_dataloaders()
        n_train = sum(p.numel() for p in student.parameters() if p.requires_grad)
        self.print_to_log_file(f"Stage B (K&G RFT): LoRA r={self.rft.lora_rank} on {self.rft.lora_targets}, "
                               f"{n_train} trainable parameters, lambda_k={self.rft.lambda_k}, "
                               f"lambda_g={self.rft.lambda_g}, buffer share {self.rft.buffer_share}")

    def configure_optimizers(self):
        if self.stage != "B":
            return super().configure_optimizers()
        params = [p for p in self.network.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, self.initial_lr, weight_decay=self.weight_decay, momentum=0.99,
                                    nesterov=True)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, max(1, self.num_epochs - self.stage_a_epochs))

    def set_deep_supervision_enabled(self, enabled: bool):
        net = unwrap(self.network)
        net = net.base_model.model if isinstance(net, lora.PeftModel) else net
        net.decoder.deep_supervision = enabled

    def _restart_dataloaders(self):
        for loader in (self.dataloader_train, self.dataloader_val):
            if loader is not None and hasattr(loader, "_finish"):
                loader._finish()
        self.dataloader_train, self.dataloader_val = self.get_dataloaders()

    def get_tr_and_val_datasets(self):
        """In stage B, buffer cases are repeated in the training identifiers so that a sample is a buffer
        case with probability ~buffer_share (nnU-Net's loader samples identifiers uniformly)."""
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        if self.stage == "B" and self.buffer_keys:
            ids = list(dataset_tr.identifiers)
            k, n = len(self.buffer_keys), len(ids)
            rest = n - k
            reps = max(1, int(round(self.rft.buffer_share * rest / (k * (1 - self.rft.buffer_share))))) if rest else 1
            dataset_tr.identifiers = sorted(ids + [key for key in self.buffer_keys for _ in range(reps - 1)])
            self.print_to_log_file(f"buffer cases x{reps}: expected buffer share "
                                   f"{k * reps / (rest + k * reps):.2f} of stage-B samples")
        return dataset_tr, dataset_val

    def train_step(self, batch: dict) -> dict:
        if self.stage != "B":
            return super().train_step(batch)
        data = batch["data"].to(self.device, non_blocking=True)
        target = [t.to(self.device, non_blocking=True) for t in batch["target"]] \
            if isinstance(batch["target"], list) else batch["target"].to(self.device, non_blocking=True)
        buffer = set(self.buffer_keys)
        in_buffer = torch.tensor([k in buffer for k in batch["keys"]], device=self.device)
        self.optimizer.zero_grad(set_to_none=True)
        zero = torch.zeros((), device=self.device)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            output = self.network(data)
            student = self._taps["student"].collect()
            seg = self.loss(output, target)
            l_k = l_g = zero
            if self.distill:
                with torch.no_grad():
                    if self.teacher_fft is not None and self.rft.lambda_k > 0:
                        self.teacher_fft(data)
                    if in_buffer.any() and self.rft.lambda_g > 0:
                        self.teacher_prev(data[in_buffer])
                if self.teacher_fft is not None and self.rft.lambda_k > 0:
                    l_k = feature_distance(student, self._taps["fft"].collect())
                if in_buffer.any() and self.rft.lambda_g > 0:
                    l_g = feature_distance([f[in_buffer] for f in student], self._taps["prev"].collect())
            loss = seg + self.rft.lambda_k * l_k + self.rft.lambda_g * l_g
            l_k, l_g = l_k.detach(), l_g.detach()
        backward_and_step(self, loss)
        return {"loss": loss.detach().cpu().numpy(), "medseqft_seg": seg.item(), "medseqft_k": l_k.item(),
                "medseqft_g": l_g.item()}

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        if self.stage == "B":
            parts = {k: float(np.mean([o[k] for o in train_outputs])) for k in LOSS_KEYS}
            for k, v in parts.items():
                self.logger.log(k, v, self.current_epoch)
            self.print_to_log_file("loss parts: " + ", ".join(f"{k[9:]} {v:.4f}" for k, v in parts.items()))

    # ------------------------------------------------------------------ checkpoints
    def medseqft_checkpoint_section(self) -> dict:
        section = {"role": "task_model", "stage": self.stage, "stage_a_epochs": self.stage_a_epochs,
                   "num_epochs": self.num_epochs, "rft": self.rft.to_dict(), "mds": self.mds.to_dict(),
                   "previous_model": self.previous, "fft_model": self.fft_provenance,
                   "foundation": self.plans_manager.plans.get("medseqft", {}).get("foundation"),
                   "buffer": getattr(self, "buffer_record", None)}
        if self.stage == "B":  # what --c needs besides previous_model.pth and F_t: the trainable parameters
            trainable = {n for n, p in self.student.named_parameters() if p.requires_grad}
            section["student_state"] = {k: v for k, v in self.student.state_dict().items() if k in trainable}
        return section

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0:
            return
        if self.stage != "B":
            return super().save_checkpoint(filename)
        # the file holds the merged plain network (stock predict works with it); training goes on with the student
        training_network = self.network
        self.network = self._fresh_network(lora.merged_state_dict(self.student))
        try:
            super().save_checkpoint(filename)
        finally:
            self.network = training_network

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        ckpt = load_checkpoint_file(filename_or_checkpoint) if isinstance(filename_or_checkpoint, str) \
            else filename_or_checkpoint
        section = ckpt.get("medseqft", {})
        if section.get("stage") != "B":
            self.stage = section.get("stage", self.stage)
            return super().load_checkpoint(ckpt)
        if not self.was_initialized:
            self.initialize()
        self.current_epoch = ckpt["current_epoch"]
        self.previous, self.buffer_record = section.get("previous_model"), section.get("buffer")
        self._enter_stage_b(student_state=section["student_state"], restart_loaders=False)
        self.my_init_kwargs = ckpt["init_args"]
        self.logger.load_checkpoint(ckpt["logging"])
        self._best_ema = ckpt["_best_ema"]
        self.optimizer.load_state_dict(ckpt["optimizer_state"])
        if self.grad_scaler is not None and ckpt.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(ckpt["grad_scaler_state"])

    def perform_actual_validation(self, save_probabilities: bool = False):
        # medseqft run scores every model itself (evaluate.py); it turns nnU-Net's duplicate pass off unless asked
        if self.plans_manager.plans.get("medseqft", {}).get("final_validation") is False and "--val" not in sys.argv:
            self.print_to_log_file("Final validation skipped (plans: medseqft.final_validation = false); "
                                   "run it with nnUNetv2_train ... --val if needed.")
            return
        super().perform_actual_validation(save_probabilities)

    def on_train_end(self):
        if self.stage == "B":
            for taps in self._taps.values():
                taps.remove()
            if self.local_rank == 0:
                lora.save_adapter(self.student, os.path.join(self.output_folder, ADAPTER_FOLDER))
            self.network = lora.merge(self.student)  # M_t: the plain network that checkpoint_final.pth holds
            self.stage = "merged"
        super().on_train_end()


class MedSeqFTFFTTrainer(MedSeqFTTrainer):
    """Stage A only: sequential full fine-tuning (the seqFFT baseline)."""
    run_stage_b = False


class MedSeqFTLoRATrainer(MedSeqFTTrainer):
    """LoRA only on M_{t-1}, no FFT stage and no distillation (the LoRA-only sequential baseline)."""
    run_stage_a = False
    distill = False


class MedSeqFTRFTTrainer(MedSeqFTTrainer):
    """Stage B only, with a given F_t (plans' ``medseqft.fft_model``) as the knowledge teacher."""
    run_stage_a = False


class MedSeqFTTrainer_randomBuffer(MedSeqFTTrainer):
    """MDS ablation: a seeded random buffer of the same size."""
    rft_overrides = {"buffer": "random"}



def _variant(name, base, epochs, iterations=None, val_iterations=None, **rft):
    # tiny budgets write checkpoint_latest.pth every epoch, so that --c always has a start point
    return budget_variant(name, base, __name__, epochs, iterations, val_iterations,
                          save_every=1 if epochs < 10 else None, rft_overrides={**base.rft_overrides, **rft})


MedSeqFTTrainer_100epochs = _variant("MedSeqFTTrainer_100epochs", MedSeqFTTrainer, 100)
MedSeqFTFFTTrainer_100epochs = _variant("MedSeqFTFFTTrainer_100epochs", MedSeqFTFFTTrainer, 100)
MedSeqFTLoRATrainer_100epochs = _variant("MedSeqFTLoRATrainer_100epochs", MedSeqFTLoRATrainer, 100)
# CPU tests and the demo: 4 epochs of 4 iterations (2 in stage A, 2 in stage B), rank 4 for 32-channel stages
MedSeqFTTrainer_tiny = _variant("MedSeqFTTrainer_tiny", MedSeqFTTrainer, 4, 4, 2, stage_b_fraction=0.5, lora_rank=4)
MedSeqFTFFTTrainer_tiny = _variant("MedSeqFTFFTTrainer_tiny", MedSeqFTFFTTrainer, 4, 4, 2)
MedSeqFTRFTTrainer_tiny = _variant("MedSeqFTRFTTrainer_tiny", MedSeqFTRFTTrainer, 4, 4, 2, lora_rank=4)
MedSeqFTLoRATrainer_tiny = _variant("MedSeqFTLoRATrainer_tiny", MedSeqFTLoRATrainer, 4, 4, 2, lora_rank=4)
MedSeqFTTrainer_randomBuffer_tiny = _variant("MedSeqFTTrainer_randomBuffer_tiny", MedSeqFTTrainer_randomBuffer,
                                             4, 4, 2, stage_b_fraction=0.5, lora_rank=4)
