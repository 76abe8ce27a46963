"""``medseqft demo``: the whole method end to end on generated data, small enough for a laptop CPU.

Generates the tiny benchmark, pre-trains a tiny foundation with masked-image modelling, runs MedSeqFT
and sequential FFT over 3 tasks + 1 unseen task, and prints the comparison table and the report's
path. Everything goes under ``--out`` (nnU-Net folders included); nnU-Net's variables are set for the
child processes only. Re-running with the same ``--out`` resumes: finished steps are kept.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import datetime

from nnunetv2_medseqft.errors import MedSeqFTError

POOL_ID, FIRST_TASK, UNSEEN_ID = 500, 501, 504  # synth with 3 tasks: 501-503, unseen 504 (liver lesion), 505
PRETRAINER = "MedSeqFTPretrainTrainer_tiny"
METHODS = ("medseqft", "seqfft")
# per task: 4 epochs x 3 iterations (2 + 2 epochs for MedSeqFT's two stages); MDS with 8 draws per case.
# A smoke budget that shows every step within minutes: its scores say nothing about the method.
RUN_ARGS = ["--epochs", "4", "--iterations", "3", "--val-iterations", "1",
            "--rft", "stage_b_fraction=0.5", "lora_rank=4", "--mds", "repeats=8"]


def demo_env(out: str) -> dict:
    from nnunetv2_medseqft.train_process import child_env

    env = child_env()
    env.update(nnUNet_raw=os.path.join(out, "nnUNet_raw"), nnUNet_preprocessed=os.path.join(out, "nnUNet_preprocessed"),
               nnUNet_results=os.path.join(out, "nnUNet_results"), nnUNet_compile="f")
    env.setdefault("nnUNet_def_n_proc", "2")
    env.setdefault("nnUNet_n_proc_DA", "2")
    return env


def _step(title: str, cmd: list[str], env: dict, log_file: str) -> None:
    from nnunetv2_medseqft.train_process import _command

    print(f"== {title}", flush=True)
    with open(log_file, "a") as log:
        proc = subprocess.run(_command(cmd), env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        with open(log_file) as f:
            tail = f.readlines()[-30:]
        raise MedSeqFTError(f"{' '.join(cmd)} failed (exit {proc.returncode}); log {log_file}:\n" + "".join(tail))


def run_demo(out: str, device: str = "cpu") -> str:
    from nnunetv2_medseqft.report import compare_rows, load_results, markdown_table, write_report
    from nnunetv2_medseqft.synth import generate

    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    env = demo_env(out)
    log_file = os.path.join(out, "demo.log")
    start = time.time()
    print(f"medseqft demo in {out} (full log: {log_file})", flush=True)

    raw = env["nnUNet_raw"]
    if not os.path.isfile(os.path.join(raw, f"Dataset{UNSEEN_ID:03d}_MSFTLiverLesion", "dataset.json")):
        print("== generating the tiny benchmark (pool, 3 tasks, 1 unseen task)", flush=True)
        generate(raw, preset="tiny", seed=0, first_id=POOL_ID, num_tasks=3)
    foundation = os.path.join(env["nnUNet_results"], "Dataset500_MSFTPool",
                              f"{PRETRAINER}__nnUNetPlans__3d_fullres", "fold_all", "checkpoint_final.pth")
    if not os.path.isfile(foundation):
        _step("planning the pre-training pool (stock nnU-Net)",
              ["nnUNetv2_plan_and_preprocess", "-d", str(POOL_ID), "-c", "3d_fullres", "-np",
               env["nnUNet_def_n_proc"]], env, log_file)
        _step("pre-training the tiny foundation M0 (masked-image modelling)",
              ["nnUNetv2_train", str(POOL_ID), "3d_fullres", "all", "-tr", PRETRAINER, "-device", device],
              env, log_file)
    tasks = [str(FIRST_TASK + i) for i in range(3)]
    runs = []
    for method in METHODS:
        name = f"demo-{method}"
        print(f"== medseqft run --method {method} over datasets {' '.join(tasks)} (+ unseen {UNSEEN_ID})", flush=True)
        cmd = [sys.executable, "-m", "nnunetv2_medseqft.cli", "run", "--foundation", foundation, "--datasets", *tasks,
               "--unseen", str(UNSEEN_ID), "--method", method, "--name", name, "--device", device, *RUN_ARGS]
        proc = subprocess.run(cmd, env=env)
        if proc.returncode != 0:
            raise MedSeqFTError(f"The {method} run stopped (exit {proc.returncode}). Resume the demo with: "
                                f"medseqft demo --out {out}")
        runs.append(os.path.join(env["nnUNet_results"], "medseqft_runs", name))
    report = write_report(runs, out=os.path.join(out, "report"))
    print()
    print(markdown_table(compare_rows([load_results(r) for r in runs])))
    print()
    print(f"Report: {report}")
    print(f"Demo finished in {(time.time() - start) / 60:.1f} min. Task models are in "
          f"{env['nnUNet_results']} (nnU-Net layout: nnUNetv2_predict works on each).")
    return report


def run(args) -> int:
    out = args.out or os.path.join(os.getcwd(), f"medseqft_demo_{datetime.now():%Y%m%d_%H%M%S}")
    run_demo(out, device=args.device)
    return 0


def configure_parser(parser, name: str) -> None:
    parser.add_argument("--out", default=None,
                        help="folder for everything (default: a fresh medseqft_demo_<time> in the current folder); "
                             "an existing demo folder is resumed")
    parser.add_argument("-device", "--device", default="cpu", choices=("cpu", "cuda", "mps"))
    parser.set_defaults(func=run)
