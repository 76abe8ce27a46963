"""Stage B of a MedSeqFT task step, K&G RFT, as one object the trainer's nnU-Net hooks delegate to.

Stage A (full fine-tuning from M_(t-1) -> F_t) is nnU-Net's own training and needs no object.
``RFTStage`` holds what stage B adds to it: the frozen teachers (F_t for knowledge retention; M0 or M_(t-1)
for generalization retention on the buffer samples), the LoRA student (F_t or M_(t-1) + peft LoRA; LoRA
factors, norms and head train), the feature taps, and its verbs: ``train_step`` (the loss),
``checkpoint_state`` (what ``--c`` needs), ``merged_state`` (the plain network a checkpoint holds) and
``finish`` (save the adapter, merge: M_t).
"""

from __future__ import annotations

import torch
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2_medseqft.trainers.steps import backward_and_step
from torch import autocast

from nnunetv2_medseqft import adapters
from nnunetv2_medseqft.checkpoints import head_of, unwrap
from nnunetv2_medseqft.method.distill import FeatureTaps, feature_distance
from nnunetv2_medseqft.method.settings import RFTSettings


NOT_COMPUTED = float("nan")  # a loss part that this step did not compute


def _part(teacher: torch.nn.Module, encoder_only: bool) -> torch.nn.Module:
    """What a teacher runs: its encoder alone where its taps are all there."""
    return unwrap(teacher).encoder if encoder_only else teacher


def frozen(net: torch.nn.Module) -> torch.nn.Module:
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


class RFTStage:
    def __init__(self, build_network, previous: dict, fft: dict | None, settings: RFTSettings, distill: bool,
                 student_state: dict | None = None, g_teacher: dict | None = None):
        """``build_network(state_dict)``: the plans' plain network with those weights, on the trainer's device.
        ``g_teacher``: the weights of the generalization teacher when it is not M_(t-1) (``g_teacher=foundation``)."""
        self.settings, self.distill = settings, distill
        self.teacher_fft = frozen(build_network(fft)) if fft is not None else None
        self.teacher_prev = frozen(build_network(g_teacher if g_teacher is not None else previous))
        if settings.student_init == "fft":  # F_t + LoRA: the task knowledge in full, the retention correction low rank
            base = build_network(fft)
        else:  # M_(t-1) + LoRA, head from F_t: the update from M_(t-1) stays low rank
            base = build_network({**previous, **(head_of(fft) if fft is not None else {})})
        self.student = adapters.add_lora(base, settings.lora_rank, settings.lora_alpha, settings.lora_targets)
        if student_state is not None:
            self.student.load_state_dict(student_state, strict=False)
        # g_layers / k_layers = encoder: that teacher's taps and forward stop at its encoder
        self.g_encoder_only, self.k_encoder_only = settings.g_layers == "encoder", settings.k_layers == "encoder"
        self.taps = {"student": FeatureTaps(self.student),
                     "prev": FeatureTaps(self.teacher_prev, "encoder" if self.g_encoder_only else None)}
        if self.teacher_fft is not None:
            self.taps["fft"] = FeatureTaps(self.teacher_fft, "encoder" if self.k_encoder_only else None)
        # the student's taps that each teacher's taps compare with
        self._index = {t: [self.taps["student"].names.index(n) for n in taps.names]
                       for t, taps in self.taps.items() if t != "student"}
        self.steps_done = 0  # schedules retention_every (restarts on --c: only the phase of the schedule moves)
        # the generalization teacher on the whole batch, its buffer rows taken from its taps: on CPU a one-sample 3D
        # convolution at the CPU scale takes PyTorch's slow kernel (evaluation/sliding_window.py), and two samples
        # through oneDNN cost less than one through it. None: on CPU only; elsewhere it runs the buffer rows alone.
        self.g_whole_batch: bool | None = None

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.student.parameters() if p.requires_grad)

    def train_step(self, trainer, batch: dict) -> dict:
        """seg + lambda_k * d(student, F_t) on the batch + lambda_g * d(student, M_(t-1)) on its buffer samples
        (each term weighted N on the steps where ``retention_every`` = N computes it). A term not computed on this
        step is returned as NaN (nnU-Net's collate_outputs takes numbers only)."""
        device, s = trainer.device, self.settings
        data = batch["data"].to(device, non_blocking=True)
        target = [t.to(device, non_blocking=True) for t in batch["target"]] \
            if isinstance(batch["target"], list) else batch["target"].to(device, non_blocking=True)
        buffer = set(trainer.buffer_keys)
        rows = [i for i, k in enumerate(batch["keys"]) if k in buffer]  # known on the host: a boolean mask on the
        in_buffer = torch.tensor(rows, dtype=torch.long, device=device)  # device would stall the GPU queue twice
        trainer.optimizer.zero_grad(set_to_none=True)
        zero = torch.zeros((), device=device)
        every, step = s.retention_every, self.steps_done
        self.steps_done += 1
        use_k = self.distill and self.teacher_fft is not None and s.lambda_k > 0 and step % every == 0
        use_g = self.distill and bool(rows) and s.lambda_g > 0 and step % every == every // 2
        g_whole = self.g_whole_batch if self.g_whole_batch is not None else device.type == "cpu"
        with autocast(device.type, enabled=True) if device.type == "cuda" else dummy_context():
            output = trainer.network(data)  # the student, DDP-wrapped where the trainer runs DDP
            student = self.taps["student"].collect()
            seg = trainer.loss(output, target)
            l_k = l_g = zero
            with torch.no_grad():
                if use_k:
                    _part(self.teacher_fft, self.k_encoder_only)(data)
                if use_g:
                    _part(self.teacher_prev, self.g_encoder_only)(data if g_whole else data.index_select(0, in_buffer))
            if use_k:
                l_k = feature_distance([student[i] for i in self._index["fft"]], self.taps["fft"].collect())
            if use_g:
                teacher = self.taps["prev"].collect()
                l_g = feature_distance([student[i].index_select(0, in_buffer) for i in self._index["prev"]],
                                       [t.index_select(0, in_buffer) for t in teacher] if g_whole else teacher)
            loss = seg + every * (s.lambda_k * l_k + s.lambda_g * l_g)
            l_k, l_g = l_k.detach(), l_g.detach()
        backward_and_step(trainer, loss)
        return {"loss": loss.detach().cpu().numpy(), "medseqft_seg": seg.item(),
                "medseqft_k": l_k.item() if use_k else NOT_COMPUTED,
                "medseqft_g": l_g.item() if use_g else NOT_COMPUTED}

    def checkpoint_state(self) -> dict:
        """The trainable parameters: with previous_model.pth and F_t they restore the student for ``--c``."""
        trainable = {n for n, p in self.student.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.student.state_dict().items() if k in trainable}

    def merged_state(self) -> dict:
        return adapters.merged_state_dict(self.student)

    def finish(self, adapter_folder: str | None) -> torch.nn.Module:
        """Remove the taps, save the adapter (rank 0 passes its folder), merge: M_t as a plain network."""
        for taps in self.taps.values():
            taps.remove()
        if adapter_folder is not None:
            adapters.save_adapter(self.student, adapter_folder)
        return adapters.merge(self.student)
