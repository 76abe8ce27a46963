"""CPU bf16 mixed precision against float32 (on demand, not in CI): one nnU-Net training step of a planned network.

The network of a plans file (default: the CPU scale's, as ``MedSeqFTCPUPlanner`` plans it for the generated
abdomen: 8-64 features, 4 stages, 32^3 patch, batch 2), nnU-Net's Dice + CE loss with deep supervision, SGD as
nnUNetTrainer. A step is forward + loss + backward + clipped SGD step, timed in float32 and under the trainers' bf16
autocast (``nnunetv2_medseqft/cpu_precision.py``: bf16 convolutions, float32 logits into the loss) in alternating
rounds, at each torch thread count given. Run alone on the machine.

  python benchmarks/bench_cpu_bf16.py [--plans PLANS.json] [--threads 1 2] [--rounds 8] [--steps 10]

The LAST line printed is a JSON object: ``bf16_step_ratio`` (median bf16 step / median float32 step, per thread
count), ``step_seconds`` and ``cpu_has_bf16`` (whether ``MEDSEQFT_CPU_BF16=auto`` turns it on here).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def build(plans_file: str | None, configuration: str = "3d_fullres"):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if plans_file:
        cfg = PlansManager(plans_file).get_configuration(configuration)
        net = nnUNetTrainer.build_network_architecture(cfg.network_arch_class_name, cfg.network_arch_init_kwargs,
                                                       cfg.network_arch_init_kwargs_req_import, 1, 4, True)
        return net, tuple(cfg.patch_size), cfg.batch_size
    from nnunetv2_medseqft.planners.cpu_planner import BASE_FEATURES, MAX_FEATURES, MAX_PATCH_EDGE

    features = tuple(min(BASE_FEATURES * 2 ** i, MAX_FEATURES) for i in range(4))
    net = PlainConvUNet(1, 4, features, torch.nn.Conv3d, 3, (1, 2, 2, 2), 2, 4, 2, True, torch.nn.InstanceNorm3d,
                        {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU, {"inplace": True},
                        deep_supervision=True)
    return net, (MAX_PATCH_EDGE,) * 3, 2


def main() -> None:
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    from nnunetv2_medseqft.cpu_precision import FloatLogits, cpu_autocast, cpu_has_bf16

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", default=None, help="a plans file (default: the CPU scale's network)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round and precision")
    args = parser.parse_args()

    torch.manual_seed(0)
    net, patch, batch = build(args.plans)
    stages = 4
    weights = [1 / 2 ** i for i in range(stages - 1)] + [0.0]  # nnU-Net's deep-supervision weights, lowest off
    weights = [w / sum(weights) for w in weights]
    loss = FloatLogits(DeepSupervisionWrapper(DC_and_CE_loss(
        {"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1, weight_dice=1,
        ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss), weights))
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    x = torch.randn(batch, 1, *patch)
    shapes = [tuple(s // 2 ** i for s in patch) for i in range(stages)]
    target = [torch.randint(0, 4, (batch, 1, *s)).float() for s in shapes]

    def step(bf16: bool) -> None:
        opt.zero_grad(set_to_none=True)
        with cpu_autocast(bf16):
            out = net(x)
            value = loss(out, target[:len(out)])
        value.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        opt.step()

    times: dict[str, list[float]] = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for bf16 in (False, True):  # warm-up: oneDNN picks its kernels on first use
            for _ in range(3):
                step(bf16)
        for _ in range(args.rounds):
            for bf16 in (False, True):
                t = time.perf_counter()
                for _ in range(args.steps):
                    step(bf16)
                times.setdefault(f"{'bf16' if bf16 else 'fp32'}_{threads}", []).append(
                    (time.perf_counter() - t) / args.steps)
    medians = {k: statistics.median(v) for k, v in times.items()}
    ratio = {str(t): medians[f"bf16_{t}"] / medians[f"fp32_{t}"] for t in args.threads}
    print(f"network: {sum(p.numel() for p in net.parameters())} parameters, patch {patch}, batch {batch}")
    for t in args.threads:
        print(f"{t} thread(s): float32 {medians[f'fp32_{t}']:.4f} s/step, bf16 {medians[f'bf16_{t}']:.4f} s/step, "
              f"ratio {ratio[str(t)]:.2f}")
    print(json.dumps({"bf16_step_ratio": ratio, "step_seconds": medians, "cpu_has_bf16": cpu_has_bf16(),
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
