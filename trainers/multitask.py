"""The multitask reference's trainer: one nnU-Net training on the union of every task's cases
(``sequence/union_dataset.py``), with partial labels modelled.

A union case is annotated for its own task's organs only. A plain merge asks for background wherever another
task's organ lies, which contradicts that task's own cases (on generated data, where every case shows every organ,
the plain merge learnt the first organ and nothing else). The marginal loss (Shi et al., 2021, partially supervised
multi-organ segmentation) instead counts, per case, the probabilities of the labels its task did not annotate as
background: their logits join the background's by log-sum-exp before nnU-Net's own Dice + CE, so the softmax of the
merged logits is exactly the marginal of the full one.
"""

from __future__ import annotations

import torch
from nnunetv2_medseqft.trainers.medseqft import MedSeqFTFFTTrainer

from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.sequence.union_dataset import task_key, unannotated_labels

_ABSENT = -1e4  # a merged label's logit: no probability left (finite, also in float16)


def marginalise(logits: torch.Tensor, unannotated: torch.Tensor) -> torch.Tensor:
    """logits (B, C, ...) and unannotated (B, C) bool (background False) -> logits whose softmax gives each case's
    unannotated labels' probability to the background and nothing to those labels."""
    mask = unannotated.to(logits.device).reshape(*unannotated.shape, *[1] * (logits.ndim - 2))
    joined = mask.clone()
    joined[:, 0] = True  # background and every label the case's task did not annotate
    background = torch.logsumexp(logits.masked_fill(~joined, float("-inf")), dim=1, keepdim=True)
    return torch.cat([background, logits[:, 1:].masked_fill(mask[:, 1:], _ABSENT)], dim=1)


class MarginalLoss(torch.nn.Module):
    """nnU-Net's loss (deep supervision included) on marginalised logits; ``cases`` are the batch's keys."""

    def __init__(self, loss: torch.nn.Module, unannotated: dict[str, list[int]]):
        super().__init__()
        self.loss, self.unannotated, self.cases = loss, unannotated, None

    def masks(self, num_classes: int) -> torch.Tensor:
        rows = []
        for case in self.cases:
            task = task_key(str(case))
            if task not in self.unannotated:
                raise MedSeqFTError(f"Case {case!r} belongs to no task of this union dataset "
                                    f"({', '.join(self.unannotated)}): rebuild it with `medseqft run --method multitask`.")
            row = torch.zeros(num_classes, dtype=torch.bool)
            row[self.unannotated[task]] = True
            rows.append(row)
        return torch.stack(rows)

    def forward(self, output, target):
        outputs = output if isinstance(output, (list, tuple)) else [output]
        masks = self.masks(outputs[0].shape[1])
        merged = [marginalise(o, masks) for o in outputs]
        return self.loss(merged if isinstance(output, (list, tuple)) else merged[0], target)


class MedSeqFTMultitaskTrainer(MedSeqFTFFTTrainer):
    """Full fine-tuning of M0 on a union dataset with the marginal loss (the ``multitask`` method)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        self.unannotated = unannotated_labels(dataset_json)  # refuses a dataset that is no union, before anything slow
        super().__init__(plans, configuration, fold, dataset_json, device)

    def _build_loss(self):
        return MarginalLoss(super()._build_loss(), self.unannotated)

    def train_step(self, batch: dict) -> dict:
        self.loss.cases = batch["keys"]
        return super().train_step(batch)

    def validation_step(self, batch: dict) -> dict:
        self.loss.cases = batch["keys"]
        return super().validation_step(batch)
