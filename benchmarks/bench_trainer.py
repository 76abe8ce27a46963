"""Trainer benchmark (on demand, not in CI): MedSeqFT stage A / stage B steps vs a stock nnUNetTrainer step.

Same plans, batches and data, measured side by side in one run (steps alternate between the
trainers in rounds, so that the load of a shared machine hits all alike). Builds its data like
bench_mds.py (synth, pool, foundation, ``medseqft plan``) in --workdir, reusing what exists.

The LAST line printed is a JSON object with exactly these keys:
  rft_step_ratio      median stage-B step / median stock step
  fft_step_ratio      median stage-A step / median stock step
  rft_peak_rss_ratio  peak RSS of a process running stage-B steps / one running stock steps (separate children)
  merge_max_abs_diff  max |logits| difference: student computed with peft's LoRA branch vs the merged plain network
  predict_time_ratio  nnUNetPredictor time on one case: merged M_t / a stock nnUNetTrainer checkpoint

Reduced CPU run: ``python benchmarks/bench_trainer.py --preset tiny --pretrain-trainer
MedSeqFTPretrainTrainer_tiny --steps 4``.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_mds import build, set_env  # noqa: E402

TRAINER = "MedSeqFTTrainer"


def make_trainers(task: str, plans_name: str, foundation: Path, which: tuple[str, ...]):
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    trainers = {}
    for name in which:
        fold = 1 if name == "fft" else 0  # stock and rft see the same fold (rft's buffer is in its batches)
        tr = get_trainer_from_args(task, "3d_fullres", fold, "nnUNetTrainer" if name == "stock" else TRAINER,
                                   plans_name, device=torch.device("cpu"))
        maybe_load_checkpoint(tr, False, False, str(foundation))
        tr.on_train_start()
        trainers[name] = tr
    return trainers


def step_fn(trainer, batches, stage):
    if stage == "B" and trainer.stage != "B":
        trainer._enter_stage_b()
    trainer.network.train()
    it = iter(range(10**9))

    def step():
        trainer.train_step(batches[next(it) % len(batches)])
    return step


def child(args) -> None:
    """Peak RSS of a fresh process that runs only one kind of step."""
    task, foundation = build(args, Path(args.workdir))
    tr = make_trainers(task, args.plans_name, foundation, (args.child,))[args.child]
    batches = [next(tr.dataloader_train) for _ in range(2)]
    step = step_fn(tr, batches, "B" if args.child == "rft" else "A")
    for _ in range(args.steps):
        step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tr.on_train_end()
    print(json.dumps({"peak_rss_kib": peak}))


def merge_diff(trainer, batch) -> float:
    import torch

    from nnunetv2_medseqft import lora

    branch = lora.add_lora(copy.deepcopy(trainer.teacher_prev).requires_grad_(True), trainer.rft.lora_rank,
                           trainer.rft.lora_alpha, trainer.rft.lora_targets, merged_weight_forward=False)
    branch.load_state_dict(trainer.student.state_dict())
    plain = trainer._fresh_network(lora.merged_state_dict(trainer.student)).eval()
    branch.eval()
    with torch.no_grad():
        return (branch(batch["data"])[0] - plain(batch["data"])[0]).abs().max().item()


def predict_ratio(trainers, task, rounds: int) -> float:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.paths import nnUNet_raw

    case = sorted((Path(nnUNet_raw) / task / "imagesTr").glob("*_0000.nii.gz"))[0]
    predictors = {}
    for name, tr in trainers.items():
        tr.on_train_end()  # MedSeqFT: merge -> checkpoint_final.pth; stock: its checkpoint_final.pth
        p = nnUNetPredictor(device=torch.device("cpu"), use_mirroring=False, allow_tqdm=False)
        p.initialize_from_trained_model_folder(tr.output_folder_base, use_folds=(tr.fold,))
        predictors[name] = p
    times = {n: [] for n in predictors}
    out = tempfile.mkdtemp()
    for name, p in predictors.items():  # warm-up, untimed
        p.predict_from_files_sequential([[str(case)]], [f"{out}/{name}"], overwrite=True)
    for r in range(rounds):
        for name, p in sorted(predictors.items(), reverse=r % 2 == 1):  # alternate who goes first
            t0 = time.perf_counter()
            p.predict_from_files_sequential([[str(case)]], [f"{out}/{name}"], overwrite=True)
            times[name].append(time.perf_counter() - t0)
    return statistics.median(times["rft"]) / statistics.median(times["stock"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None)
    p.add_argument("--preset", default="bench")
    p.add_argument("--pretrain-trainer", default="MedSeqFTPretrainTrainer_50epochs")
    p.add_argument("--task", type=int, default=1)
    p.add_argument("--plans-name", default="MedSeqFTPlans")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=("cpu",))
    p.add_argument("--steps", type=int, default=8, help="timed steps per trainer (default: 8)")
    p.add_argument("--predict-rounds", type=int, default=6)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.workdir = str(Path(args.workdir or tempfile.mkdtemp(prefix="bench_trainer_")).resolve())
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    set_env(Path(args.workdir))
    if args.child:
        child(args)
        return 0

    task, foundation = build(args, Path(args.workdir))
    rss = {}
    for kind in ("stock", "rft"):
        out = subprocess.run([sys.executable, __file__, *(argv or sys.argv[1:]), "--workdir", args.workdir,
                              "--child", kind], capture_output=True, text=True, check=True).stdout
        rss[kind] = json.loads(out.strip().splitlines()[-1])["peak_rss_kib"]

    trainers = make_trainers(task, args.plans_name, foundation, ("stock", "fft", "rft"))
    batches = [next(trainers["stock"].dataloader_train) for _ in range(2)]
    steps = {"stock": step_fn(trainers["stock"], batches, "A"), "fft": step_fn(trainers["fft"], batches, "A"),
             "rft": step_fn(trainers["rft"], batches, "B")}
    for step in steps.values():  # warm-up
        step()
    times = {n: [] for n in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}
    print("median step seconds:", {n: round(v, 3) for n, v in med.items()})
    result = {
        "rft_step_ratio": med["rft"] / med["stock"],
        "fft_step_ratio": med["fft"] / med["stock"],
        "rft_peak_rss_ratio": rss["rft"] / rss["stock"],
        "merge_max_abs_diff": merge_diff(trainers["rft"], batches[0]),
    }
    del trainers["fft"]
    result["predict_time_ratio"] = predict_ratio(trainers, task, args.predict_rounds)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
