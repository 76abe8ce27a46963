"""MedSeqFTTrainer under DistributedDataParallel: 2 CPU processes in a gloo group run the real step code."""

import socket
import subprocess
import sys
from pathlib import Path

import torch
from conftest import FIRST_TASK_ID


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_gloo_stage_a_and_b_steps(planned_task, tiny_foundation, tmp_path):
    env = planned_task.folders.env()
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2", nnUNet_n_proc_DA="0")
    worker = Path(__file__).parent / "ddp_worker.py"
    procs = [subprocess.Popen([sys.executable, str(worker), str(FIRST_TASK_ID), str(tiny_foundation), str(tmp_path)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert r0["stage"] == r1["stage"] == "B" and r0["device"] == "cpu"
    assert r0["trainable"].keys() == r1["trainable"].keys()
    # each rank saw its own half batch; DDP averaged the gradients, so the replicas stay identical
    assert all(torch.equal(r0["trainable"][k], r1["trainable"][k]) for k in r0["trainable"])
    lora_b = [k for k in r0["trainable"] if "lora_B" in k]
    assert lora_b and any(r0["trainable"][k].abs().sum() > 0 for k in lora_b), "the stage-B step updated LoRA"
