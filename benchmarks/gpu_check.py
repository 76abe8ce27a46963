"""GPU readiness of the stage-B step (CUDA + AMP + LoRA + feature hooks, torch.compile) at a real nnU-Net size.

On demand, on a CUDA machine: ``python benchmarks/gpu_check.py [--patch 128] [--steps 10]``.
Network: nnU-Net's default 3d_fullres PlainConvUNet for a CT patch (6 stages, 32..320 features),
batch 2. Compares, in one process, a stock FFT step with the MedSeqFT stage-B step (LoRA student as peft's
branch and as one conv with the merged weight,
F_t teacher on the batch, M_(t-1) teacher on one buffer sample). The segmentation loss is CE on the
full-resolution output (nnU-Net's Dice+CE needs the whole nnU-Net install; its cost is the same in
both steps). The LAST line is a JSON object.
"""

import argparse
import copy
import json
import statistics
import time

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from nnunetv2_medseqft import adapters as lora
from nnunetv2_medseqft.method.distill import FeatureTaps, feature_distance
from nnunetv2_medseqft.method.settings import RFTSettings


def build(n_classes=3):
    return PlainConvUNet(1, 6, (32, 64, 128, 256, 320, 320), torch.nn.Conv3d, 3, (1, 2, 2, 2, 2, 2), 2, n_classes,
                         2, True, torch.nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None,
                         torch.nn.LeakyReLU, {"inplace": True}, deep_supervision=True)


def timed(step, steps):
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    x = torch.randn(2, 1, args.patch, args.patch, args.patch, device=dev)
    y = torch.randint(0, 3, (2, args.patch, args.patch, args.patch), device=dev)
    ce = torch.nn.CrossEntropyLoss()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "patch": args.patch, "batch": 2}

    def make_step(net, params, extra=None):
        opt = torch.optim.SGD(params, 1e-2, momentum=0.99, nesterov=True)
        scaler = torch.amp.GradScaler("cuda")

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda"):
                out = net(x)[0]
                loss = ce(out, y) + (extra() if extra else 0)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 12)
            scaler.step(opt)
            scaler.update()
            return loss
        return step

    base = build().to(dev)
    plain = copy.deepcopy(base)
    result["fft_step_s"] = timed(make_step(plain, list(plain.parameters())), args.steps)
    torch.cuda.reset_peak_memory_stats()
    timed(make_step(plain, list(plain.parameters())), 2)
    result["fft_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30

    s = RFTSettings()
    teacher_fft, teacher_prev = copy.deepcopy(base).eval(), copy.deepcopy(base).eval()
    for t in (teacher_fft, teacher_prev):
        t.requires_grad_(False)
    tf, tp = FeatureTaps(teacher_fft), FeatureTaps(teacher_prev)

    def stage_b(merged_weight_forward):
        student = lora.add_lora(copy.deepcopy(base), s.lora_rank, s.lora_alpha, s.lora_targets,
                                merged_weight_forward=merged_weight_forward)
        taps = FeatureTaps(student)

        def distill():
            feats = taps.collect()
            with torch.no_grad():
                teacher_fft(x)
                teacher_prev(x[1:])
            return feature_distance(feats, tf.collect()) + feature_distance([f[1:] for f in feats], tp.collect())

        params = [p for p in student.parameters() if p.requires_grad]
        return student, taps, make_step(student, params, distill), params, distill

    students = {}
    for label, merged_forward in (("peft_branch", False), ("merged_weight", True)):
        student, taps, step_b, params, distill = stage_b(merged_forward)
        students[label] = (student, taps)
        result[f"rft_{label}_step_s"] = timed(step_b, args.steps)
        torch.cuda.reset_peak_memory_stats()
        timed(step_b, 2)
        result[f"rft_{label}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result[f"rft_{label}_step_ratio"] = result[f"rft_{label}_step_s"] / result["fft_step_s"]
    # teacher cost alone (no_grad forwards of F_t on the batch and M_(t-1) on one sample)
    def teachers():
        with torch.no_grad(), torch.autocast("cuda"):
            teacher_fft(x)
            teacher_prev(x[1:])
        tf.collect()
        tp.collect()
    result["teachers_fwd_s"] = timed(teachers, args.steps)
    loss = step_b()
    result["amp_loss_finite"] = bool(torch.isfinite(loss).item())

    with torch.no_grad(), torch.autocast("cuda", enabled=False):
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # true fp32
        branch, branch_taps = students["peft_branch"]  # trained above: its B factors are non-zero
        unmerged = branch(x)[0].float()
        branch_taps.collect()
        merged_net = build().to(dev)
        merged_net.load_state_dict(lora.merged_state_dict(branch))
        result["merge_max_abs_diff_fp32"] = (merged_net(x)[0].float() - unmerged).abs().max().item()
        result["logit_abs_max"] = unmerged.abs().max().item()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True

    try:
        compiled = torch.compile(student)
        step_c = make_step(compiled, params, distill)
        t0 = time.perf_counter()
        step_c()
        torch.cuda.synchronize()
        result["compile_first_step_s"] = time.perf_counter() - t0
        result["compile_rft_step_s"] = timed(step_c, args.steps)
        result["compile_with_lora_and_hooks"] = "ok"
    except Exception as e:  # recorded, not hidden: the trainers keep compile off
        result["compile_with_lora_and_hooks"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
