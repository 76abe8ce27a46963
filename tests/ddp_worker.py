"""One rank of the 2-process gloo DDP test: real MedSeqFTTrainer, one stage-A and one stage-B step.

Run by test_ddp.py with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT and nnU-Net's variables set."""

import os
import sys

import torch
import torch.distributed as dist


def main(task: str, foundation: str, out: str) -> None:
    dist.init_process_group("gloo")
    from nnunetv2.run.run_training import get_trainer_from_args

    from nnunetv2_medseqft.checkpoints import load_checkpoint_file, unwrap

    t = get_trainer_from_args(task, "3d_fullres", 4, "MedSeqFTTrainer_tiny", "MedSeqFTPlans", device=torch.device("cpu"))
    # what -pretrained_weights does; nnU-Net's own loader maps to CUDA whenever a process group exists
    t.initialize()
    weights = load_checkpoint_file(foundation)["network_weights"]
    net = unwrap(t.network)
    net.load_state_dict({**net.state_dict(), **{k: v for k, v in weights.items() if ".seg_layers." not in k}})
    t.on_train_start()
    assert isinstance(t.network, torch.nn.parallel.DistributedDataParallel) and t.batch_size == 1
    t.train_step(next(t.dataloader_train))  # stage A
    t._enter_stage_b(restart_loaders=False)
    t.train_step(next(t.dataloader_train))  # stage B: LoRA student under DDP, teachers on every rank
    trainable = {n: p.detach().clone() for n, p in t.student.named_parameters() if p.requires_grad}
    torch.save({"trainable": trainable, "device": str(t.device), "stage": t.stage},
               os.path.join(out, f"rank{dist.get_rank()}.pt"))
    for loader in (t.dataloader_train, t.dataloader_val):
        if hasattr(loader, "_finish"):
            loader._finish()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
