"""LoRA conv backward benchmark (on demand, not in CI): does skipping the frozen weight's gradient pay?

``MergedWeightConv3d`` (the layer MedSeqFT trains) computes one convolution with W + s * B A; autograd then forms
the full weight gradient of that convolution (as costly as full fine-tuning) and projects it onto A and B. The
alternative measured here computes the same gradients without it: the input gradient through W + s * B A, dB from
the output gradient and z = conv(x, A) (saved in the forward), dA as the weight gradient of a convolution with only
r output channels. It saves one full convolution and pays two with r output channels, so it can win only where
the layer is wide against the rank. Not adopted: see the result file for where it would pay.

Per layer shape (batch 2, 3^3 kernel, rank --rank), one forward + backward, alternating, medians, one thread.
The LAST line printed is a JSON object: {"C_in-C_out@edge": lowrank / merged seconds, ...,
"max_rel_grad_diff": largest relative difference of the input, A and B gradients between the two}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

LAYERS = [(8, 8, 32), (16, 16, 32), (32, 32, 16), (32, 64, 16), (64, 64, 8), (128, 128, 8), (256, 256, 8),
          (320, 320, 4)]  # (C_in, C_out, edge): the CPU scale's widths up to the GPU presets'


class LowRankGradConv3d(torch.autograd.Function):
    """y = conv(x, W + s B A); gradients for x, A and B only (W and the bias are frozen)."""

    @staticmethod
    def forward(ctx, x, w, bias, a, b, scale, padding):
        z = F.conv3d(x, a, None, 1, padding)
        w_eff = w + torch.einsum("or,rikjl->oikjl", b[:, :, 0, 0, 0], a) * scale
        ctx.save_for_backward(x, w_eff, a, b, z)
        ctx.scale, ctx.padding = scale, padding
        return F.conv3d(x, w_eff, bias, 1, padding)

    @staticmethod
    def backward(ctx, gy):
        x, w_eff, a, b, z = ctx.saved_tensors
        pad, s = ctx.padding, ctx.scale
        gx = torch.ops.aten.convolution_backward(gy, x, w_eff, None, [1] * 3, pad, [1] * 3, False, [0] * 3, 1,
                                                 [True, False, False])[0]
        gb = torch.einsum("novwx,nrvwx->or", gy, z)[:, :, None, None, None] * s
        gz = torch.einsum("or,novwx->nrvwx", b[:, :, 0, 0, 0], gy) * s
        ga = torch.ops.aten.convolution_backward(gz, x, a, None, [1] * 3, pad, [1] * 3, False, [0] * 3, 1,
                                                 [False, True, False])[1]
        return gx, None, None, ga, gb, None, None


def merged(x, w, bias, a, b, scale, padding):
    return F.conv3d(x, w + torch.einsum("or,rikjl->oikjl", b[:, :, 0, 0, 0], a) * scale, bias, 1, padding)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default: MedSeqFT's 8)")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result, worst = {}, 0.0
    for c_in, c_out, edge in LAYERS:
        x = torch.randn(2, c_in, edge, edge, edge, requires_grad=True)
        w, bias = torch.randn(c_out, c_in, 3, 3, 3) * 0.05, torch.randn(c_out)
        a = (torch.randn(args.rank, c_in, 3, 3, 3) * 0.05).requires_grad_()
        b = (torch.randn(c_out, args.rank, 1, 1, 1) * 0.05).requires_grad_()
        gy = torch.randn(2, c_out, edge, edge, edge)
        fns = {"merged": lambda: merged(x, w, bias, a, b, 2.0, (1, 1, 1)),
               "lowrank": lambda: LowRankGradConv3d.apply(x, w, bias, a, b, 2.0, (1, 1, 1))}
        grads, times = {}, {n: [] for n in fns}
        for i in range(args.rounds + 1):
            for name, fn in fns.items():
                x.grad = a.grad = b.grad = None
                t0 = time.perf_counter()
                fn().backward(gy)
                if i:  # the first round warms up
                    times[name].append(time.perf_counter() - t0)
                grads[name] = [x.grad.clone(), a.grad.clone(), b.grad.clone()]
        worst = max(worst, *(((g - h).abs().max() / g.abs().max()).item()
                             for g, h in zip(grads["merged"], grads["lowrank"])))
        med = {n: statistics.median(t) for n, t in times.items()}
        key = f"{c_in}-{c_out}@{edge}"
        result[key] = round(med["lowrank"] / med["merged"], 3)
        print(f"{key:>14}: merged {med['merged']:.4f} s, lowrank {med['lowrank']:.4f} s, ratio {result[key]:.2f}")
    result["max_rel_grad_diff"] = worst
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
