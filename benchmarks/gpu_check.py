"""The stage-B step against a stock nnU-Net step on a GPU, at nnU-Net's real size (on demand, on a CUDA machine).

``python benchmarks/gpu_check.py [--patch 128] [--steps 10] [--compile]``

Network: nnU-Net's default 3d_fullres PlainConvUNet for a CT patch (6 stages, 32..320 features), batch 2, AMP.
The FFT step is nnUNetTrainer.train_step's arithmetic: deep-supervision Dice+CE (nnU-Net's own loss classes),
GradScaler, gradient clipping at 12, SGD with Nesterov momentum 0.99 (``backward_and_step``, the trainers' own).
The stage-B step is the trainers' ``RFTStage.train_step`` itself (LoRA student as one conv with W + BA, the
teachers and taps as the readings say), with one of the two samples from the buffer (the default
buffer_share 0.5). What the data loader costs is the same for both steps and is left out. Arms: the default
readings and the costlier ones (``k_layers=all``; ``g_layers=all`` as well: the readings of the 2026-11-26 check);
``--arms`` chooses others, and ``no-teachers`` times the LoRA student alone (the rest is what the teachers add).
Steps are timed in alternating blocks (FFT, each arm, FFT, ...) and the median of each is kept.
``--compile``: the same with the FFT network and the student compiled (torch.compile, as nnU-Net does on a GPU).
The LAST line is a JSON object: ``rft_step_ratio`` (default readings / FFT) and every arm's seconds and ratio.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunetv2_medseqft.method.settings import RFTSettings
from nnunetv2_medseqft.trainers.stages import RFTStage
from nnunetv2_medseqft.trainers.steps import backward_and_step

STRIDES = (1, 2, 2, 2, 2, 2)
ARMS = ("default", "k_layers=all", "k_layers=all,g_layers=all")
NO_TEACHERS = "no-teachers"  # the LoRA student alone (RFTStage with distill off): what the teachers add is the rest


def readings(arm: str) -> dict:
    from nnunetv2_medseqft.method.settings import key_value

    return {} if arm in ("default", NO_TEACHERS) else dict(key_value(kv) for kv in arm.split(","))


def build(n_classes=3):
    return PlainConvUNet(1, 6, (32, 64, 128, 256, 320, 320), torch.nn.Conv3d, 3, STRIDES, 2, n_classes,
                         2, True, torch.nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None,
                         torch.nn.LeakyReLU, {"inplace": True}, deep_supervision=True)


def nnunet_loss():
    """nnUNetTrainer._build_loss for a label map without regions: weights 1/2^i over the outputs, last one 0."""
    loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    w = np.array([1 / 2 ** i for i in range(len(STRIDES) - 1)])
    w[-1] = 0
    return DeepSupervisionWrapper(loss, w / w.sum())


def trainer_for(network, params, device):
    """What ``backward_and_step`` and ``RFTStage.train_step`` read of an nnUNetTrainer."""
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None  # as nnUNetTrainer
    return types.SimpleNamespace(device=device, network=network, loss=nnunet_loss(), grad_scaler=scaler,
                                 optimizer=torch.optim.SGD(params, 1e-2, momentum=0.99, nesterov=True),
                                 buffer_keys=["buffer_case"])


def fft_step(trainer, batch):
    trainer.optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cuda", enabled=trainer.device.type == "cuda"):
        loss = trainer.loss(trainer.network(batch["data"]), batch["target"])
    backward_and_step(trainer, loss)
    return loss


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_blocks(steps: dict, n: int, rounds: int = 3) -> dict:
    """Median seconds per step of each callable, timed in alternating blocks of n after 3 warm-ups each."""
    for f in steps.values():
        for _ in range(3):
            f()
    sync()
    times = {k: [] for k in steps}
    for _ in range(rounds):
        for k, f in steps.items():
            for _ in range(n):
                t0 = time.perf_counter()
                f()
                sync()
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_gib(f) -> float | None:
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    f()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def _distance_with_float32_copies(student, teacher, eps=1e-6):
    """feature_distance as it was before 2026-12-04 (float32 copies of every feature map): the reference."""
    terms = [((s.float() - t.float()) ** 2).mean() / ((t.float() ** 2).mean() + eps) for s, t in zip(student, teacher)]
    return torch.stack(terms).mean()


def parts(stage, x, n: int) -> dict:
    """Seconds of the pieces of the default stage-B step, each timed alone: the teachers' encoder forwards (as
    they run, and in channels_last_3d), and the knowledge distance forward + backward (now, and with float32 copies)."""
    from nnunetv2_medseqft.method.distill import feature_distance
    from nnunetv2_medseqft.trainers.stages import _part

    t_fft, t_prev = _part(stage.teacher_fft, True), _part(stage.teacher_prev, True)
    one = x[:1]

    def teachers():
        with torch.no_grad(), torch.autocast("cuda"):
            t_fft(x)
            t_prev(one)

    with torch.no_grad(), torch.autocast("cuda"):
        t_fft(x)
        teacher_feats = stage.taps["fft"].collect()
    student_feats = [(f + 0.01 * torch.randn_like(f)).detach().requires_grad_(True) for f in teacher_feats]

    def distance(fn):
        def run():
            with torch.autocast("cuda"):
                fn(student_feats, teacher_feats).backward()
        return run

    out = timed_blocks({"teachers": teachers, "distance": distance(feature_distance),
                        "distance_fp32_copies": distance(_distance_with_float32_copies)}, n)
    for t in (t_fft, t_prev):
        t.to(memory_format=torch.channels_last_3d)
    x_cl, one_cl = (v.contiguous(memory_format=torch.channels_last_3d) for v in (x, one))

    def teachers_cl():
        with torch.no_grad(), torch.autocast("cuda"):
            t_fft(x_cl)
            t_prev(one_cl)
    out["teachers_channels_last"] = timed_blocks({"t": teachers_cl}, n)["t"]
    for t in (t_fft, t_prev):
        t.to(memory_format=torch.contiguous_format)
    for taps in stage.taps.values():
        taps._outputs = {}  # what the timing loops left behind
    return {f"part_{k}_s": v for k, v in out.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10, help="steps per timed block (3 blocks per variant)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--arms", nargs="+", default=list(ARMS),
                    help=f"stage-B readings to time: default, {NO_TEACHERS}, or KEY=VALUE[,KEY=VALUE...]")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script, not a measurement")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    p = args.patch
    x = torch.randn(2, 1, p, p, p, device=dev)
    y = torch.randint(0, 3, (2, 1, p, p, p), device=dev).float()
    targets = [y] + [torch.nn.functional.interpolate(y, scale_factor=0.5 ** i, mode="nearest") for i in range(1, 5)]
    batch = {"data": x, "target": targets, "keys": ["buffer_case", "task_case"]}
    result = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
              "patch": p, "batch": 2,
              "compile": args.compile}

    base = build().to(dev)
    states = {name: copy.deepcopy(base).state_dict() for name in ("M0", "M_prev", "F_t")}

    def build_network(state):
        net = build().to(dev)
        net.load_state_dict(state)
        return net

    plain = build_network(states["F_t"])
    fft = trainer_for(torch.compile(plain) if args.compile else plain, list(plain.parameters()), dev)
    steps = {"fft": lambda: fft_step(fft, batch)}
    stages = {}
    arms = list(dict.fromkeys(["default"] + args.arms))
    for arm in arms:
        stage = RFTStage(build_network, states["M_prev"], states["F_t"], RFTSettings(**readings(arm)),
                         distill=arm != NO_TEACHERS, g_teacher=states["M0"])
        student = stage.student
        params = [q for q in student.parameters() if q.requires_grad]
        tr = trainer_for(torch.compile(student) if args.compile else student, params, dev)
        stages[arm] = (stage, tr)
        steps[arm] = lambda stage=stage, tr=tr: stage.train_step(tr, batch)
    if args.compile:
        t0 = time.perf_counter()
        for f in steps.values():
            f()
        sync()
        result["compile_first_steps_s"] = round(time.perf_counter() - t0, 1)
    seconds = timed_blocks(steps, args.steps)
    result["fft_step_s"] = seconds["fft"]
    result["fft_peak_gib"] = peak_gib(steps["fft"])
    for arm in arms:
        result[f"rft[{arm}]_step_s"] = seconds[arm]
        result[f"rft[{arm}]_step_ratio"] = seconds[arm] / seconds["fft"]
        result[f"rft[{arm}]_peak_gib"] = peak_gib(steps[arm])
    result.update(parts(stages["default"][0], x, args.steps))
    out = stages["default"][0].train_step(stages["default"][1], batch)
    result["default_losses_finite"] = bool(np.isfinite(out["loss"]).all() and np.isfinite(out["medseqft_k"]))
    result["rft_step_ratio"] = result["rft[default]_step_ratio"]
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
