"""Trainer benchmark (on demand, not in CI): MedSeqFT stage A / stage B steps vs a stock nnUNetTrainer step.

Same plans, batches and data, measured side by side in one run (steps alternate between the
trainers in rounds, so that the load of a shared machine hits all alike). Builds its data like
bench_mds.py (synth, pool, foundation, ``medseqft plan``) in --workdir, reusing what exists.

The LAST line printed is a JSON object with these keys:
  rft_step_ratio      median stage-B step / median stock step
  rft_step_ratio_by_arm  the same for each --arms reading of stage B (e.g. k_layers=encoder), side by side, and
                      for g-buffer-rows: the generalization teacher on the buffer rows alone (GPU's way) on CPU
  rft_step_mean_ratio_by_arm  mean stage-B step / mean stock step, for the plans' reading and each arm (the cost
                      per step of a reading whose steps alternate, e.g. retention_every=2)
  fft_step_ratio      median stage-A step / median stock step
  rft_peak_rss_ratio  peak RSS of a process running stage-B steps / one running stock steps (separate children)
  merge_max_abs_diff  max |logits| difference: student computed with peft's LoRA branch vs the merged plain network
  predict_time_ratio  nnUNetPredictor time on one case: merged M_t / a stock nnUNetTrainer checkpoint
  cpu_scale_iteration_ratio  median whole iteration (the trainer's own loader + train_step, stock
                      nnUNetTrainer) at --scale / at --reference-scale (tiny), alternating in one process
  iteration_seconds   those medians, seconds

CPU scale: ``python benchmarks/bench_trainer.py --workdir W`` (builds both scales in W, tiny at id 600).
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
from bench_ablation import parse_arm  # noqa: E402
from bench_mds import add_scale_args, build, set_env  # noqa: E402

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


def buffer_batches(trainer, buffer: set, n: int = 2) -> list:
    """n batches of the trainer's loader with one buffer case each: the expected count of stage B's batch of 2 at
    buffer_share 0.5, so that every step pays the generalization teacher as training does on average."""
    batches = []
    for _ in range(500):
        batch = next(trainer.dataloader_train)
        if sum(k in buffer for k in batch["keys"]) == 1:
            batches.append(batch)
            if len(batches) == n:
                return batches
    raise SystemExit(f"no batch with one buffer case in 500 draws (buffer {sorted(buffer)})")


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

    from nnunetv2_medseqft import adapters as lora

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
    add_scale_args(p)
    p.add_argument("--reference-scale", default="tiny",
                   help="scale whose whole nnU-Net iteration (loader + train_step) --scale is compared with "
                        "(cpu_scale_iteration_ratio; built at --first-id + 100; 'none' skips it)")
    p.add_argument("--iterations", type=int, default=30, help="timed loader+step iterations per scale (default: 30)")
    p.add_argument("--task", type=int, default=1)
    p.add_argument("--plans-name", default="MedSeqFTPlans")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=("cpu",))
    p.add_argument("--steps", type=int, default=8, help="timed steps per trainer (default: 8)")
    p.add_argument("--predict-rounds", type=int, default=6)
    p.add_argument("--arms", nargs="*", default=["k-all", "g-all"],
                   help="stage-B readings timed next to the plans' own: bench_ablation's arms (a reading's name or "
                        "NAME:key=value,...)")
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
    batches = buffer_batches(trainers["stock"], set(trainers["rft"].buffer_keys))
    steps = {"stock": step_fn(trainers["stock"], batches, "A"), "fft": step_fn(trainers["fft"], batches, "A"),
             "rft": step_fn(trainers["rft"], batches, "B")}
    from nnunetv2_medseqft.method.settings import RFTSettings

    arms = dict(parse_arm(a) for a in args.arms)
    for name, overrides in arms.items():  # stage B under another reading, in the same rounds
        tr = make_trainers(task, args.plans_name, foundation, ("rft",))["rft"]
        tr.rft = RFTSettings.from_dict({**tr.rft.to_dict(), **overrides})
        steps[f"rft:{name}"] = step_fn(tr, batches, "B")
    # the generalization teacher on the buffer rows alone, as on GPU (on CPU it runs the whole batch: stages.py)
    tr = make_trainers(task, args.plans_name, foundation, ("rft",))["rft"]
    steps["rft:g-buffer-rows"] = step_fn(tr, batches, "B")
    tr.rft_stage.g_whole_batch = False
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
        "rft_step_ratio_by_arm": {n: med[f"rft:{n}"] / med["stock"] for n in [*arms, "g-buffer-rows"]},
        # means too: with retention_every > 1 the steps alternate between costs, and a median picks one of them
        "rft_step_mean_ratio_by_arm": {n: statistics.mean(times[k]) / statistics.mean(times["stock"])
                                       for n, k in [("plans", "rft"), *((a, f"rft:{a}") for a in arms)]},
        "fft_step_ratio": med["fft"] / med["stock"],
        "rft_peak_rss_ratio": rss["rft"] / rss["stock"],
        "merge_max_abs_diff": merge_diff(trainers["rft"], batches[0]),
    }
    del trainers["fft"]
    result["predict_time_ratio"] = predict_ratio(trainers, task, args.predict_rounds)
    if args.reference_scale != "none":
        result.update(iteration_ratio(args, trainers["stock"], Path(args.workdir)))
    print(json.dumps(result))
    return 0


def iteration_ratio(args, stock, workdir: Path) -> dict:
    """A whole nnU-Net iteration (next batch from the trainer's own loader + train_step) of a stock
    nnUNetTrainer at --scale and at --reference-scale, alternating, medians."""
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    ref_args = argparse.Namespace(**{**vars(args), "scale": args.reference_scale, "first_id": args.first_id + 100,
                                     "pretrain_trainer": None})
    ref_task, ref_foundation = build(ref_args, workdir)
    ref = get_trainer_from_args(ref_task, "3d_fullres", 0, "nnUNetTrainer", args.plans_name, device=torch.device("cpu"))
    maybe_load_checkpoint(ref, False, False, str(ref_foundation))
    ref.on_train_start()
    trainers = {args.scale: stock, args.reference_scale: ref}
    load, step = ({n: [] for n in trainers} for _ in range(2))
    for i in range(args.iterations + 2):
        for name, tr in trainers.items():
            tr.network.train()
            t0 = time.perf_counter()
            batch = next(tr.dataloader_train)
            t1 = time.perf_counter()
            tr.train_step(batch)
            t2 = time.perf_counter()
            if i >= 2:  # warm-up
                load[name].append(t1 - t0)
                step[name].append(t2 - t1)
    ref.on_train_end()
    total = {n: statistics.median([a + b for a, b in zip(load[n], step[n])]) for n in trainers}
    details = {n: {"iteration_s": round(total[n], 4), "loader_wait_s": round(statistics.median(load[n]), 4),
                   "train_step_s": round(statistics.median(step[n]), 4),
                   "patch": list(tr.configuration_manager.patch_size), "batch": tr.batch_size,
                   "features": list(tr.configuration_manager.network_arch_init_kwargs["features_per_stage"])}
               for n, tr in trainers.items()}
    print("whole iterations:", json.dumps(details))
    return {"cpu_scale_iteration_ratio": total[args.scale] / total[args.reference_scale],
            "iteration_seconds": {n: details[n]["iteration_s"] for n in trainers}}


if __name__ == "__main__":
    sys.exit(main())
