"""The methods ``medseqft run`` compares, all on the same planning, budget and evaluation.

Each is one trainer applied task by task; what differs is the trainer and where a task starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from nnunetv2_medseqft.errors import MedSeqFTError


@dataclass(frozen=True)
class Method:
    name: str
    trainer: str
    chained: bool  # task t starts from M_(t-1); otherwise from the foundation M0
    mds: bool  # scores an MDS buffer before training
    has_fft: bool  # keeps F_t (checkpoint_fft.pth) next to M_t
    union: bool  # one training on the union of all tasks (the all-data reference)
    description: str

    @property
    def lora(self) -> bool:
        """Trains a stage B (LoRA on M_(t-1), merged), hence needs a buffer and a LoRA rank the network can use."""
        return self.trainer not in ("MedSeqFTFFTTrainer", "MedSeqFTMultitaskTrainer")

    @property
    def two_stage(self) -> bool:
        """Stage A then stage B (the MedSeqFT trainers): every reading of K&G RFT applies."""
        return self.has_fft and self.lora


METHODS = {m.name: m for m in (
    Method("medseqft", "MedSeqFTTrainer", True, True, True, False,
           "MedSeqFT: FFT stage (F_t) then K&G RFT with an MDS buffer, merged into M_t"),
    Method("seqfft", "MedSeqFTFFTTrainer", True, False, False, False,
           "sequential full fine-tuning M_(t-1) -> M_t, no retention"),
    Method("parallel", "MedSeqFTFFTTrainer", False, False, False, False,
           "parallel full fine-tuning: every task from M0"),
    Method("lora", "MedSeqFTLoRATrainer", True, False, False, False,
           "sequential LoRA only (merged after each task), no distillation"),
    Method("random-buffer", "MedSeqFTTrainer_randomBuffer", True, False, True, False,
           "MedSeqFT with a random buffer of the same size (MDS ablation)"),
    Method("multitask", "MedSeqFTMultitaskTrainer", False, False, False, True,
           "one full fine-tuning of M0 on the union of all tasks' training cases (sees all data at once; "
           "the marginal loss for partial labels)"),
)}

# unseen-task transfer: the same full fine-tuning from the run's final body and from M0
UNSEEN_TRAINER = "MedSeqFTFFTTrainer"


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise MedSeqFTError(f"Unknown method {name!r}: choose one of {', '.join(METHODS)}.")
    return METHODS[name]
