"""MedSeqFT task-step trainers.

``nnUNetv2_train D 3d_fullres FOLD -tr MedSeqFTTrainer -p MedSeqFTPlans -pretrained_weights PREV``:
  stage A (FFT): every parameter trained from M_{t-1} -> F_t for the trainer's epochs, saved as
    ``checkpoint_fft.pth``;
  stage B (K&G RFT), stage_b_fraction of the epochs on top: student = F_t frozen + peft LoRA on every stage
    conv, norms and head trainable; loss = seg + lambda_k * d(student, F_t) on the batch
    + lambda_g * d(student, M0) on the encoder stages, on the MDS-buffer samples of the batch (the two
    retention terms on alternate steps, each weighted 2: retention_every);
  merge: ``checkpoint_final.pth`` holds M_t as a plain nnU-Net network; ``adapter/`` the peft adapter.
The readings the paper leaves open (student start, teacher on the buffer and its layers, exported model,
stage-B budget and optimiser) are the plans' ``medseqft.rft`` settings (``RFTSettings``); above are the defaults,
chosen on fold 0 (README, "Method choices").
Every checkpoint is a plain network (LoRA merged on the fly), so stock nnUNetv2_predict works with
any of them; stage-B checkpoints also carry the trainable student state for ``--c``. On a CPU with bf16 hardware
the training and validation steps run in bf16 mixed precision (``cpu_precision.py``), as nnU-Net's fp16 on CUDA.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2_medseqft.trainers.stages import RFTStage
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunetv2_medseqft import adapters
from nnunetv2_medseqft.checkpoints import (
    MedSeqFTCheckpointMixin,
    atomic_torch_save,
    load_checkpoint_file,
    state_fingerprint,
    unwrap,
    with_head,
)
from nnunetv2_medseqft.cpu_precision import LOG_LINE, FloatLogits, cpu_autocast, cpu_bf16
from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.method.buffer import oversampled_identifiers, random_buffer, select_buffer
from nnunetv2_medseqft.method.foundation import recorded_foundation, require_3d_configuration
from nnunetv2_medseqft.method.previous_model import check_previous_model, previous_model_path
from nnunetv2_medseqft.method.settings import MDSSettings, RFTSettings
from nnunetv2_medseqft.pacing import PacedEpochsMixin
from nnunetv2_medseqft.paths import resolved
from nnunetv2_medseqft.plugin.variants import apply_budget, budget_variant, seed_everything
from nnunetv2_medseqft.threads import apply_torch_threads

PREVIOUS_MODEL_FILE = "previous_model.pth"  # M_{t-1} as loaded (fresh head): teacher + LoRA base, also on --c
FFT_CHECKPOINT_FILE = "checkpoint_fft.pth"  # F_t
ADAPTER_FOLDER = "adapter"
LOSS_KEYS = ("medseqft_seg", "medseqft_k", "medseqft_g")


class MedSeqFTTrainer(MedSeqFTCheckpointMixin, PacedEpochsMixin, nnUNetTrainer):
    """One task step: stage A (FFT) for the first epochs, stage B (``RFTStage``) for the rest, then the merge.

    ``self.stage`` is "A", "B" or "merged" (recorded in every checkpoint); in stage B, ``self.rft_stage``
    holds the student and teachers and ``self.network`` is the student."""

    stages = ("fft", "rft")  # variants keep one: FFT only (seqFFT), stage B only (LoRA / RFT with a given F_t)
    distill = True  # False: stage B without the retention terms (the LoRA-only baseline)
    rft_overrides: dict = {}  # trainer-name variants (nnU-Net's way to vary settings)
    warmup_epochs = 0  # stage A: linear learning-rate warm-up epochs before the poly schedule (plans' budget)
    mirroring = 1  # 0: no mirroring augmentation and no test-time mirror axes (anatomy with a left and a right side)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        require_3d_configuration(plans, configuration, self.__class__.__name__)
        apply_torch_threads()
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp and not torch.cuda.is_available():  # a gloo process group on CPUs (tests, CPU clusters)
            self.device, self.grad_scaler = torch.device("cpu"), None
        self.cpu_bf16 = cpu_bf16(self.device)  # bf16 mixed precision on a CPU that computes it (cpu_precision.py)
        section = plans.get("medseqft", {})
        self.rft = RFTSettings.from_dict({**section.get("rft", {}), **self.rft_overrides})
        self.mds = MDSSettings.from_dict(section.get("mds", {}))
        apply_budget(self, section.get("budget") or {})
        if section.get("seed") is not None:  # head init and the main process' sampling; DA workers draw their own
            seed_everything(int(section["seed"]))
        self.stage = "A" if "fft" in self.stages else "B"
        self.rft_stage: RFTStage | None = None
        self.previous = None  # provenance of M_{t-1}
        self.fft_provenance = None  # a given F_t (stage-B-only trainer)
        self.buffer_keys: list[str] = []
        self.buffer_record = None
        self._init_fingerprint = None
        self._extra_epochs = 0  # rft.budget = fft_full: stage B's epochs on top of the trainer's
        self.g_teacher = None  # the generalization teacher: which model, and the fingerprint of its weights
        self.student_start = None  # fingerprint of the student's merged weights when stage B began

    @property
    def student(self):
        return self.rft_stage.student if self.rft_stage else None

    @property
    def teacher_prev(self):
        return self.rft_stage.teacher_prev if self.rft_stage else None

    @property
    def stage_a_epochs(self) -> int:
        if "rft" not in self.stages:
            return self.num_epochs
        if "fft" not in self.stages:
            return 0
        base = self.num_epochs - self._extra_epochs
        return base if self.rft.budget == "fft_full" else int(round(base * (1 - self.rft.stage_b_fraction)))

    def _do_i_compile(self):
        if super()._do_i_compile():
            self.print_to_log_file("torch.compile is off for MedSeqFT task trainers: the network is rebuilt "
                                   "(LoRA student, teachers) between stages, which discards a compiled graph. "
                                   "Compiling works with LoRA and hooks (benchmarks/gpu_check.py).")
        return False

    # ------------------------------------------------------------------ nnU-Net lifecycle
    def initialize(self):
        self._check_readings()  # before anything slow
        if "fft" in self.stages and "rft" in self.stages and not self._extra_epochs:  # fft_full: A keeps the budget
            self._extra_epochs = self.rft.stage_b_extra_epochs(self.num_epochs)
            self.num_epochs += self._extra_epochs
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

    def _check_readings(self):
        """Refuse readings this trainer cannot train (``RFTSettings`` already refused unknown values)."""
        r, name = self.rft, self.__class__.__name__
        if "rft" not in self.stages:
            return
        has_fft = "fft" in self.stages or bool(self.plans_manager.plans.get("medseqft", {}).get("fft_model"))
        for key, value, other in (("student_init", "fft", "previous"), ("export", "fft", "merged")):
            if getattr(r, key) == value and not has_fft:
                raise MedSeqFTError(f"{name}: rft {key}={value} needs F_t, and this trainer has none (no stage A and "
                                    f"no medseqft.fft_model in the plans). Use MedSeqFTTrainer, or {key}={other}.")
        if r.budget == "fft_full" and "fft" not in self.stages:
            raise MedSeqFTError(f"{name}: rft budget=fft_full gives stage A the full budget, and this trainer has no "
                                f"stage A. Use MedSeqFTTrainer, or budget=split.")
        if r.g_teacher == "foundation":
            if not self.distill:
                raise MedSeqFTError(f"{name}: rft g_teacher=foundation sets the teacher of the retention term, and "
                                    f"this trainer trains without retention. Use MedSeqFTTrainer.")
            self.g_teacher = {"model": "foundation", **recorded_foundation(self.plans_manager.plans, name)}

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        if self.current_epoch == 0:  # a fresh start (not --c): check and keep M_(t-1) before anything slow
            given_fft = self._given_stage_a()
            self._record_previous_model()
            if given_fft is not None:
                self._take_stage_a(given_fft)
        self._select_buffer()  # before the loaders exist: stage-B loaders over-sample the buffer
        super().on_train_start()
        if self.cpu_bf16:
            self.print_to_log_file(LOG_LINE)
        for key in LOSS_KEYS:
            self.logger.local_logger.my_fantastic_logging.setdefault(key, [])
        if self.stage == "B" and self.rft_stage is None:  # no stage A: stage B from the first epoch
            self._enter_stage_b(restart_loaders=False)

    def on_epoch_start(self):
        if self.stage == "A" and self.current_epoch >= self.stage_a_epochs:
            self._enter_stage_b()
        super().on_epoch_start()

    def on_train_epoch_start(self):
        self.network.train()
        if self.stage == "A" and self.current_epoch < self._warmup_epochs:  # fresh head on a trained body
            for group in self.optimizer.param_groups:
                group["lr"] = self.initial_lr * (self.current_epoch + 1) / self._warmup_epochs
        else:  # each stage (and stage A after its warm-up) has its own poly schedule
            offset = self.stage_a_epochs if self.stage == "B" else self._warmup_epochs
            self.lr_scheduler.step(self.current_epoch - offset)
        self.print_to_log_file("")
        self.print_to_log_file(f"Epoch {self.current_epoch} (MedSeqFT stage {self.stage})")
        self.print_to_log_file(f"Current learning rate: {np.round(self.optimizer.param_groups[0]['lr'], decimals=5)}")
        self.logger.log("lrs", self.optimizer.param_groups[0]["lr"], self.current_epoch)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, patch, mirror_axes = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if not self.mirroring:  # as nnU-Net's nnUNetTrainerNoMirroring: a mirrored abdomen swaps liver and spleen sides
            mirror_axes = self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, patch, mirror_axes

    def _build_loss(self):
        loss = super()._build_loss()
        return FloatLogits(loss) if self.cpu_bf16 else loss

    def train_step(self, batch: dict) -> dict:
        with cpu_autocast(self.cpu_bf16):  # on CUDA nnU-Net's own autocast (fp16) applies inside
            return self.rft_stage.train_step(self, batch) if self.rft_stage else super().train_step(batch)

    def validation_step(self, batch: dict) -> dict:
        with cpu_autocast(self.cpu_bf16):
            return super().validation_step(batch)

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        if self.rft_stage:
            # each term's mean over the steps that computed it (retention_every, batches without buffer samples)
            parts = {k: [o[k] for o in train_outputs if not np.isnan(o[k])] for k in LOSS_KEYS}
            parts = {k: float(np.mean(v)) if v else 0.0 for k, v in parts.items()}
            for k, v in parts.items():
                self.logger.log(k, v, self.current_epoch)
            self.print_to_log_file("loss parts: " + ", ".join(f"{k[9:]} {v:.4f}" for k, v in parts.items()))

    def on_train_end(self):
        if self.rft_stage:
            adapter = os.path.join(self.output_folder, ADAPTER_FOLDER) if self.local_rank == 0 else None
            self.network = self.rft_stage.finish(adapter)  # M_t: the plain network that checkpoint_final.pth holds
            self.rft_stage, self.stage = None, "merged"
            if self.rft.export == "fft":  # F_t is the task model; M_t stays rebuildable (adapter/ on its base)
                fft = load_checkpoint_file(self._fft_teacher_path(leaving_stage_a=False), what="F_t checkpoint")
                self.network = self._fresh_network(fft["network_weights"])
                self.print_to_log_file("rft export=fft: checkpoint_final.pth holds F_t (M_t: adapter/ on its base)")
        super().on_train_end()

    def perform_actual_validation(self, save_probabilities: bool = False):
        # medseqft run scores every model itself (evaluation/validation.py); it turns nnU-Net's duplicate pass off unless asked
        if self.plans_manager.plans.get("medseqft", {}).get("final_validation") is False and "--val" not in sys.argv:
            self.print_to_log_file("Final validation skipped (plans: medseqft.final_validation = false); "
                                   "run it with nnUNetv2_train ... --val if needed.")
            return
        super().perform_actual_validation(save_probabilities)

    # ------------------------------------------------------------------ M_(t-1) and the buffer
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

    def _given_stage_a(self) -> dict | None:
        """Plans' ``medseqft.fft_model`` given to a trainer with a stage A: F_t was trained elsewhere with this
        stage A's recipe (``medseqft run``: the shared full fine-tuning of M0 on the first task), so stage A is
        taken from it (``_take_stage_a``). Returns its checkpoint, or None when stage A is trained here."""
        path = resolved(self.plans_manager.plans.get("medseqft", {}).get("fft_model"))
        if not path or "fft" not in self.stages or "rft" not in self.stages:
            return None
        self.fft_provenance = check_previous_model(path, self.plans_manager.plans, self.configuration_name,
                                                   self.__class__.__name__, what="medseqft.fft_model")
        ckpt = load_checkpoint_file(path, what="F_t checkpoint")
        trained = len(ckpt["logging"]["train_losses"])
        if trained != self.stage_a_epochs:
            raise MedSeqFTError(f"{self.__class__.__name__}: medseqft.fft_model {path} was trained for {trained} "
                                f"epochs and this trainer's stage A has {self.stage_a_epochs}: it is not this stage "
                                f"A. Remove fft_model from the plans to train stage A here. Nothing was trained.")
        return {**ckpt, "path": path}

    def _take_stage_a(self, ckpt: dict):
        """F_t's weights and training log as if stage A had run here: the first epoch trained is stage B's."""
        unwrap(self.network).load_state_dict(ckpt["network_weights"])
        self.logger.load_checkpoint(ckpt["logging"])
        self.current_epoch = self.stage_a_epochs
        self.print_to_log_file(f"Stage A given (plans' medseqft.fft_model, {self.current_epoch} epochs): "
                               f"{ckpt['path']}")

    def _select_buffer(self):
        if "rft" not in self.stages:
            return
        tr_keys, _ = self.do_split()
        k = self.mds.buffer_size(len(tr_keys))
        if self.rft.buffer == "random":
            self.buffer_keys = random_buffer(tr_keys, k, self.mds.seed)
            self.buffer_record = {"mode": "random", "buffer": self.buffer_keys}
        else:
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

    def get_tr_and_val_datasets(self):
        """In stage B, buffer cases are repeated in the training identifiers so that a sample is a buffer
        case with probability ~buffer_share (nnU-Net's loader samples identifiers uniformly)."""
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        if self.stage == "B" and self.buffer_keys:
            rest = len(dataset_tr.identifiers) - len(self.buffer_keys)
            dataset_tr.identifiers, reps = oversampled_identifiers(list(dataset_tr.identifiers), self.buffer_keys,
                                                                   self.rft.buffer_share)
            k = len(self.buffer_keys)
            self.print_to_log_file(f"buffer cases x{reps}: expected buffer share "
                                   f"{k * reps / (rest + k * reps):.2f} of stage-B samples")
        return dataset_tr, dataset_val

    # ------------------------------------------------------------------ stage B
    def _enter_stage_b(self, student_state: dict | None = None, restart_loaders: bool = True):
        """F_t and M_(t-1) as teachers, the LoRA student, its optimizer and buffer-weighted loaders."""
        previous = torch.load(os.path.join(self.output_folder, PREVIOUS_MODEL_FILE), map_location="cpu",
                              weights_only=False)["network_weights"]
        fft_path = self._fft_teacher_path(leaving_stage_a=student_state is None)
        fft = load_checkpoint_file(fft_path, what="F_t checkpoint")["network_weights"] if fft_path else None
        g_teacher = None
        if self.rft.g_teacher == "foundation":  # M0's body (its SSL head is no segmentation head), any head
            m0 = load_checkpoint_file(self.g_teacher["path"], what="foundation checkpoint")
            g_teacher = with_head(m0["network_weights"], previous)
        self.rft_stage = RFTStage(self._fresh_network, previous, fft, self.rft, self.distill, student_state, g_teacher)
        self.g_teacher = {**(self.g_teacher or {"model": "previous"}),
                          "fingerprint": state_fingerprint(self.rft_stage.teacher_prev.state_dict())}
        if student_state is None:
            self.student_start = state_fingerprint(self.rft_stage.merged_state())
        self.network = self._wrap_ddp(self.rft_stage.student) if self.is_ddp else self.rft_stage.student
        self.stage = "B"
        self.optimizer, self.lr_scheduler = self.configure_optimizers()
        self.set_deep_supervision_enabled(self.enable_deep_supervision)
        if restart_loaders:
            self._restart_dataloaders()
        self.print_to_log_file(f"Stage B (K&G RFT): LoRA r={self.rft.lora_rank} on {self.rft.lora_targets}, "
                               f"{self.rft_stage.trainable_parameters} trainable parameters, "
                               f"lambda_k={self.rft.lambda_k}, lambda_g={self.rft.lambda_g}, "
                               f"buffer share {self.rft.buffer_share}")

    def _fft_teacher_path(self, leaving_stage_a: bool) -> str | None:
        """F_t: the network stage A ends with (saved now when leaving it), or the one given in the plans."""
        if "fft" in self.stages:
            path = os.path.join(self.output_folder, FFT_CHECKPOINT_FILE)
            if leaving_stage_a:
                self.save_checkpoint(path)
                self.print_to_log_file(f"Stage A done: F_t saved as {path}")
                self._barrier()
            return path
        if not self.distill and self.rft.student_init != "fft" and self.rft.export != "fft":
            return None
        path = resolved(self.plans_manager.plans.get("medseqft", {}).get("fft_model"))
        if not path:
            raise MedSeqFTError(
                f"{self.__class__.__name__} runs stage B only and needs F_t: set \"fft_model\": "
                f"\"PATH/checkpoint_fft.pth\" in the plans' medseqft section (or use MedSeqFTTrainer).")
        self.fft_provenance = check_previous_model(path, self.plans_manager.plans, self.configuration_name,
                                                   self.__class__.__name__, what="medseqft.fft_model")
        return path

    @property
    def _warmup_epochs(self) -> int:
        return min(int(self.warmup_epochs), max(0, self.stage_a_epochs - 1))

    def configure_optimizers(self):
        if self.stage != "B":
            optimizer, scheduler = super().configure_optimizers()
            if self._warmup_epochs or self._extra_epochs:  # nnU-Net's poly, behind the warm-up, over stage A's budget
                horizon = self.num_epochs - self._extra_epochs - self._warmup_epochs
                scheduler = PolyLRScheduler(optimizer, self.initial_lr, horizon)
            return optimizer, scheduler
        params = [p for p in self.network.parameters() if p.requires_grad]
        if self.rft.stage_b_optimizer == "adamw":  # LoRA's usual optimiser: B starts at 0, Adam moves it at once
            lr = self.rft.stage_b_lr or 1e-3
            optimizer = torch.optim.AdamW(params, lr, weight_decay=self.weight_decay)
        else:
            lr = self.rft.stage_b_lr or self.initial_lr
            optimizer = torch.optim.SGD(params, lr, weight_decay=self.weight_decay, momentum=0.99, nesterov=True)
        return optimizer, PolyLRScheduler(optimizer, lr, max(1, self.num_epochs - self.stage_a_epochs))

    def set_deep_supervision_enabled(self, enabled: bool):
        net = unwrap(self.network)
        net = net.base_model.model if isinstance(net, adapters.PeftModel) else net
        net.decoder.deep_supervision = enabled

    def _fresh_network(self, state_dict: dict) -> torch.nn.Module:
        net = self.build_network_architecture(self.plans_manager, self.configuration_manager, self.num_input_channels,
                                              self.label_manager.num_segmentation_heads, self.enable_deep_supervision)
        net.load_state_dict(state_dict)
        return net.to(self.device)

    def _restart_dataloaders(self):
        for loader in (self.dataloader_train, self.dataloader_val):
            if loader is not None and hasattr(loader, "_finish"):
                loader._finish()
        self.dataloader_train, self.dataloader_val = self.get_dataloaders()

    def _barrier(self):
        if self.is_ddp:
            torch.distributed.barrier()

    def _wrap_ddp(self, net: torch.nn.Module) -> torch.nn.Module:
        if self.device.type == "cuda":
            return DDP(torch.nn.SyncBatchNorm.convert_sync_batchnorm(net), device_ids=[self.local_rank])
        return DDP(net)

    # ------------------------------------------------------------------ checkpoints
    def medseqft_checkpoint_section(self) -> dict:
        section = {"role": "task_model", "stage": self.stage, "stage_a_epochs": self.stage_a_epochs,
                   "num_epochs": self.num_epochs, "rft": self.rft.to_dict(), "mds": self.mds.to_dict(),
                   "previous_model": self.previous, "fft_model": self.fft_provenance,
                   "foundation": self.plans_manager.plans.get("medseqft", {}).get("foundation"),
                   "buffer": self.buffer_record, "g_teacher": self.g_teacher,
                   "student_start": self.student_start, "cpu_bf16": self.cpu_bf16}
        if self.rft_stage:  # what --c needs besides previous_model.pth and F_t: the trainable parameters
            section["student_state"] = self.rft_stage.checkpoint_state()
        return section

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0:
            return
        if not self.rft_stage:
            return super().save_checkpoint(filename)
        # the file holds the merged plain network (stock predict works with it); training goes on with the student
        training_network = self.network
        self.network = self._fresh_network(self.rft_stage.merged_state())
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
        self.student_start, self.fft_provenance = section.get("student_start"), section.get("fft_model")
        self._enter_stage_b(student_state=section["student_state"], restart_loaders=False)
        self.my_init_kwargs = ckpt["init_args"]
        self.logger.load_checkpoint(ckpt["logging"])
        self._best_ema = ckpt["_best_ema"]
        self.optimizer.load_state_dict(ckpt["optimizer_state"])
        if self.grad_scaler is not None and ckpt.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(ckpt["grad_scaler_state"])


class MedSeqFTFFTTrainer(MedSeqFTTrainer):
    """Stage A only: sequential full fine-tuning (the seqFFT baseline)."""
    stages = ("fft",)


class MedSeqFTLoRATrainer(MedSeqFTTrainer):
    """LoRA only on M_{t-1}, no FFT stage and no distillation (the LoRA-only sequential baseline)."""
    stages = ("rft",)
    distill = False
    rft_overrides = {"student_init": "previous", "budget": "split", "g_teacher": "previous"}  # no F_t, no teacher


class MedSeqFTRFTTrainer(MedSeqFTTrainer):
    """Stage B only, with a given F_t (plans' ``medseqft.fft_model``) as the knowledge teacher."""
    stages = ("rft",)
    rft_overrides = {"budget": "split"}  # no stage A to give the full budget to: every epoch is stage B


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
