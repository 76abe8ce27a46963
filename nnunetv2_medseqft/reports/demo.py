"""``medseqft demo``: the whole method end to end on generated data, at the CPU scale.

Generates the CPU-scale benchmark (pool + liver + spleen), plans the pool with ``MedSeqFTCPUPlanner``,
pre-trains a short foundation by masked-image modelling, runs MedSeqFT, sequential FFT and parallel FFT
over liver -> spleen, and prints the comparison table and the report's path (with a validation slice,
ground truth and prediction per task). Unseen-task transfer is left to ``benchmarks/bench_fidelity.py``:
it doubles the training count. Everything goes under ``--out`` (nnU-Net folders included); nnU-Net's
variables are set for the child processes only. Re-running with the same ``--out`` resumes.

All three methods begin with the same training: full fine-tuning of M0 on the liver (parallel FFT's and seqFFT's
first task, MedSeqFT's first stage A), trained once and shared (``sequence/runner.py``). On a CPU the runs go in
two phases of two lanes (``CPU_PHASES``), one torch thread per lane, a lane that finishes giving its core to the
other (``run_lanes``): first full fine-tuning of M0 on the liver and on the spleen at once, each a parallel FFT run
over one task (``demo-parallel-501``, ``demo-parallel-502``); then MedSeqFT beside seqFFT followed by parallel FFT,
which finds both of its models trained and only scores them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime

from nnunetv2_medseqft.errors import MedSeqFTError

SCALE = "cpu"
POOL_ID, FIRST_TASK, NUM_TASKS = 500, 501, 2  # synth with 2 tasks: 501 liver, 502 spleen (503/504 unseen, unused)
PRETRAINER = "MedSeqFTPretrainTrainer_cpuDemo"  # 8 of _cpu's 60 epochs (reconstruction score ~0.79 vs ~0.89)
METHODS = ("medseqft", "seqfft", "parallel")
# parallel FFT over one task: full fine-tuning of M0 on it, the M0 reference that every run of the demo reuses
# (not in the comparison: the parallel run over both tasks finds these models and scores them)
M0_REFERENCES = tuple(f"parallel-{FIRST_TASK + i}" for i in range(NUM_TASKS))
# on a CPU: phases one after the other, the lanes of a phase at once (one torch thread each).
CPU_PHASES = (tuple((ref,) for ref in M0_REFERENCES), (("medseqft",), ("seqfft", "parallel")))
MDS_ARGS = ["--mds", "repeats=16"]  # 16 draws per case: the buffer of a demo, not the paper's 1000


def demo_env(out: str) -> dict:
    from nnunetv2_medseqft.sequence.train_process import child_env

    env = child_env()
    env.update(nnUNet_raw=os.path.join(out, "nnUNet_raw"), nnUNet_preprocessed=os.path.join(out, "nnUNet_preprocessed"),
               nnUNet_results=os.path.join(out, "nnUNet_results"), nnUNet_compile="f")
    env.setdefault("nnUNet_def_n_proc", "2")
    env.setdefault("nnUNet_n_proc_DA", "2")
    return env


def _step(title: str, cmd: list[str], env: dict, log_file: str) -> None:
    from nnunetv2_medseqft.sequence.train_process import _command

    print(f"== {title}", flush=True)
    with open(log_file, "a") as log:
        proc = subprocess.run(_command(cmd), env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        with open(log_file) as f:
            tail = f.readlines()[-30:]
        raise MedSeqFTError(f"{' '.join(cmd)} failed (exit {proc.returncode}); log {log_file}:\n" + "".join(tail))


def run_demo(out: str, device: str = "cpu") -> str:
    from nnunetv2_medseqft.reports.report import compare_rows, load_results, markdown_table, write_report
    from nnunetv2_medseqft.scales import get_scale
    from nnunetv2_medseqft.synth import generate
    from nnunetv2_medseqft.synth.datasets import default_datasets

    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    env = demo_env(out)
    log_file = os.path.join(out, "demo.log")
    start = time.time()
    print(f"medseqft demo in {out} (full log: {log_file})", flush=True)

    raw = env["nnUNet_raw"]
    scale = get_scale(SCALE)
    last = default_datasets(POOL_ID, NUM_TASKS)[-1]
    if not os.path.isfile(os.path.join(raw, last.name, "dataset.json")):
        print(f"== generating the {scale.name}-scale benchmark (pool, liver, spleen)", flush=True)
        generate(raw, preset=scale.preset, seed=0, first_id=POOL_ID, num_tasks=NUM_TASKS)
    foundation = os.path.join(env["nnUNet_results"], f"Dataset{POOL_ID}_MSFTPool",
                              f"{PRETRAINER}__{scale.plans_name}__3d_fullres", "fold_all", "checkpoint_final.pth")
    if not os.path.isfile(foundation):
        if not os.path.isdir(os.path.join(env["nnUNet_preprocessed"], f"Dataset{POOL_ID}_MSFTPool",
                                          f"{scale.plans_name}_3d_fullres")):
            _step(f"planning the pre-training pool (nnU-Net's planning with {scale.planner})",
                  scale.plan_pool_command(POOL_ID, env["nnUNet_def_n_proc"]), env, log_file)
        _step("pre-training the foundation M0 (masked-image modelling)",
              ["nnUNetv2_train", str(POOL_ID), "3d_fullres", "all", "-tr", PRETRAINER, "-p", scale.plans_name,
               "-device", device], env, log_file)
    tasks = [str(FIRST_TASK + i) for i in range(NUM_TASKS)]

    def run_command(method: str, name: str, datasets: list[str]) -> list[str]:
        return [sys.executable, "-m", "nnunetv2_medseqft.cli.main", "run", "--foundation", foundation,
                "--datasets", *datasets, "--method", method, "--name", f"demo-{name}", "--device", device,
                *scale.budget_args(), *MDS_ARGS]  # the benchmark's task budget (24 x 50)

    commands = {method: run_command(method, method, tasks) for method in METHODS}
    commands.update({ref: run_command("parallel", ref, [task]) for ref, task in zip(M0_REFERENCES, tasks)})
    phases = CPU_PHASES if device == "cpu" else ((METHODS,),)  # a GPU: one run at a time
    print(f"== medseqft run over datasets {' '.join(tasks)}: " + ", then ".join(
        " and ".join(" then ".join(lane) for lane in lanes) + (" at once" if len(lanes) > 1 else "")
        for lanes in phases), flush=True)
    failed = []
    for lanes in phases:  # a failed run stops the demo after its phase: later phases may need its models
        failed += run_lanes([[(m, commands[m]) for m in lane] for lane in lanes], env)
        if failed:
            break
    if failed:
        raise MedSeqFTError(f"The {' and '.join(failed)} run{'s' if len(failed) > 1 else ''} stopped (the output "
                            f"above says why). Resume the demo with: medseqft demo --out {out}")
    runs = [os.path.join(env["nnUNet_results"], "medseqft_runs", f"demo-{m}") for m in METHODS]
    report = write_report(runs, out=os.path.join(out, "report"))
    print()
    print(markdown_table(compare_rows([load_results(r) for r in runs])))
    print()
    print(f"Report: {report}")
    print(f"Demo finished in {(time.time() - start) / 60:.1f} min. Task models are in "
          f"{env['nnUNet_results']} (nnU-Net layout: nnUNetv2_predict works on each).")
    return report


def run_lanes(lanes: list[list[tuple[str, list[str]]]], env: dict) -> list[str]:
    """Run the lanes at once (with several, each child gets one torch thread per lane's share of the cores, and
    when a lane finishes the others take over its cores at their next epoch: ``MEDSEQFT_TORCH_THREADS_FILE``),
    the commands of a lane one after the other, a lane stopping at its first failure; every output line is
    printed with its label. Returns the labels that failed (a lane's failure leaves the other lanes running)."""
    from nnunetv2_medseqft.sequence.train_process import _command
    from nnunetv2_medseqft.threads import THREADS_FILE_ENV, threads_env, threads_per_job, write_threads_file

    env = {**env, "PYTHONUNBUFFERED": "1"}  # lines as they come, not in bursts through the pipe
    threads_file = None
    if len(lanes) > 1:
        fd, threads_file = tempfile.mkstemp(prefix="medseqft_threads_")
        os.close(fd)
        write_threads_file(threads_file, threads_per_job(len(lanes)))
        env.update(threads_env(len(lanes)), **{THREADS_FILE_ENV: threads_file})
    failed, lock, running = [], threading.Lock(), [len(lanes)]

    def lane_main(lane: list[tuple[str, list[str]]]) -> None:
        try:
            for label, cmd in lane:
                proc = subprocess.Popen(_command(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, bufsize=1)
                for line in proc.stdout:
                    with lock:
                        print(f"[{label}] {line}", end="", flush=True)
                if proc.wait() != 0:
                    failed.append(label)
                    return
        finally:
            with lock:
                running[0] -= 1
                if threads_file and running[0]:
                    write_threads_file(threads_file, threads_per_job(running[0]))

    threads = [threading.Thread(target=lane_main, args=(lane,), daemon=True) for lane in lanes]
    try:
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():  # join in steps, so that Ctrl-C reaches this thread (the children get it too)
                t.join(timeout=0.5)
    finally:
        if threads_file:
            os.remove(threads_file)
    return failed


def run(args) -> int:
    from nnunetv2_medseqft.cpu_precision import check_cpu_bf16_setting

    check_cpu_bf16_setting()  # before generating data: a bad MEDSEQFT_CPU_BF16 would stop the first training
    out = args.out or os.path.join(os.getcwd(), f"medseqft_demo_{datetime.now():%Y%m%d_%H%M%S}")
    run_demo(out, device=args.device)
    return 0


def configure_parser(parser, name: str) -> None:
    parser.add_argument("--out", default=None,
                        help="folder for everything (default: a fresh medseqft_demo_<time> in the current folder); "
                             "an existing demo folder is resumed")
    parser.add_argument("-device", "--device", default="cpu", choices=("cpu", "cuda", "mps"))
    parser.set_defaults(func=run)
