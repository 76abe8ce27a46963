"""Pieces of nnU-Net's training step shared by every MedSeqFT trainer."""

import torch


def backward_and_step(trainer, loss: torch.Tensor, max_grad_norm: float = 12.0) -> None:
    """Backward + clipped optimizer step, with the AMP grad scaler on CUDA, exactly as nnUNetTrainer.train_step."""
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    if trainer.grad_scaler is not None:
        trainer.grad_scaler.scale(loss).backward()
        trainer.grad_scaler.unscale_(trainer.optimizer)
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        trainer.grad_scaler.step(trainer.optimizer)
        trainer.grad_scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        trainer.optimizer.step()
