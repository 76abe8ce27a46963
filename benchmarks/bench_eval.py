"""Scoring benchmark (on demand, not in CI): nnU-Net's one-tile sliding window against tiles in batches.

Scores one task model on its fold's validation cases with ``ValidationSet`` (prediction, export to the
original geometry, Dice and HD95), with the predictor's ``tile_batch`` at 1 (nnU-Net's forwards) and at the
CPU default, alternating in rounds so that the load of a shared machine hits both alike. Needs nnU-Net's
variables for a workdir holding the model (e.g. one of ``bench_fidelity.py``'s).

The LAST line printed is a JSON object with these keys:
  eval_tile_batch_speedup  median scoring seconds with one tile per forward / with tile_batch tiles
  seconds                  those medians, and per validation case
  max_abs_logit_diff       max |logits| difference over the cases between the two (float rounding)
  dice_diff                |mean Dice (tile_batch) - mean Dice (one tile)|, points
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True, help="e.g. Dataset501_MSFTLiver")
    p.add_argument("--plans", required=True, help="plans name the model was trained with")
    p.add_argument("--model", required=True, help="checkpoint_final.pth of a model of that dataset and plans")
    p.add_argument("--fold", default="1")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a --jobs 2 benchmark run uses 1)")
    args = p.parse_args()

    import torch

    from nnunetv2_medseqft.evaluation.sliding_window import CPU_TILE_BATCH
    from nnunetv2_medseqft.evaluation.validation import ValidationSet, load_weights

    torch.set_num_threads(args.threads)
    fold = args.fold if args.fold == "all" else int(args.fold)
    val = ValidationSet.load(args.dataset, args.plans, "3d_fullres", fold)
    weights = load_weights(args.model)
    predictor = val.predictor
    seconds, dice = {1: [], CPU_TILE_BATCH: []}, {}
    for _ in range(args.rounds):
        for tile_batch in seconds:
            predictor.tile_batch = tile_batch
            start = time.perf_counter()
            dice[tile_batch] = val.score(weights)["mean"]["dice"]
            seconds[tile_batch].append(time.perf_counter() - start)
    logit_diff = 0.0
    for _, data, _, _ in val.cases:
        logits = {}
        for tile_batch in seconds:
            predictor.tile_batch = tile_batch
            logits[tile_batch] = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).float()
        logit_diff = max(logit_diff, float((logits[1] - logits[CPU_TILE_BATCH]).abs().max()))
    med = {b: statistics.median(s) for b, s in seconds.items()}
    print(f"{args.dataset}, {len(val.cases)} validation cases, patch {val.predictor.configuration_manager.patch_size}, "
          f"{args.threads} thread(s), {platform.processor() or platform.machine()}")
    for b, s in seconds.items():
        print(f"  tile_batch {b}: median {med[b]:.1f} s ({med[b] / len(val.cases):.2f} s per case; rounds "
              f"{', '.join(f'{x:.1f}' for x in s)}), mean Dice {dice[b]:.2f}")
    b, n = CPU_TILE_BATCH, len(val.cases)
    print(json.dumps({"eval_tile_batch_speedup": round(med[1] / med[b], 2),
                      "seconds": {"one_tile": round(med[1], 2), f"tile_batch_{b}": round(med[b], 2),
                                  "per_case_one_tile": round(med[1] / n, 2), f"per_case_tile_batch_{b}": round(med[b] / n, 2)},
                      "max_abs_logit_diff": logit_diff, "dice_diff": abs(dice[1] - dice[CPU_TILE_BATCH]),
                      "threads": args.threads}))


if __name__ == "__main__":
    main()
