"""``medseqft run``: bad inputs, the manifest's guarantees, and real 2-task sequences (the killed and resumed
MedSeqFT run is the session fixture ``medseqft_run``)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from nnunet_helpers import (
    BIN,
    PACKABLE,
    folder_hashes,
    manifest,
    resolved_paths,
    run,
    run_cmd,
    run_python,
    runner_code,
)

from nnunetv2_medseqft.errors import MedSeqFTError

# ---------------------------------------------------------------- bad inputs (no training)

@pytest.mark.parametrize("datasets, unseen, message", [
    (["987"], [], "not in $nnUNet_raw"),
    (["501", "502"], ["502"], "overlaps"),
    (["Dataset990_Broken"], [], "not an nnU-Net raw dataset"),
    (["Dataset991_TwoChannels"], [], "input channel"),
])
def test_bad_inputs_are_refused_before_anything_is_written(nnunet, tiny_foundation, datasets, unseen, message):
    broken = nnunet.raw / "Dataset990_Broken"
    broken.mkdir(exist_ok=True)
    (broken / "dataset.json").write_text("{}")
    two = nnunet.raw / "Dataset991_TwoChannels"
    for sub in ("imagesTr", "labelsTr"):
        (two / sub).mkdir(parents=True, exist_ok=True)
    (two / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT", "1": "CT"}, "labels": {
        "background": 0, "x": 1}, "numTraining": 0, "file_ending": ".nii.gz"}))
    cmd = ["medseqft", "run", "--foundation", str(tiny_foundation), "--datasets", *datasets, "--name", "bad"]
    if unseen:
        cmd += ["--unseen", *unseen]
    proc = run(cmd, nnunet, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert not (nnunet.results / "medseqft_runs" / "bad").exists()


@pytest.mark.parametrize("extra, message", [
    (["--rft", "lora_rank=100000"], "LoRA rank 100000 exceeds"),
    (["--rft", "lambda_k=abc"], "lambda_k='abc' must be a number"),
    (["--mds", "repeats=2.5"], "repeats=2.5 must be an integer or none"),
    (["--mds", "k=1000"], "exceeds the fold's"),
    (["--epochs", "0"], "--epochs must be an integer >= 1"),
    (["--iterations", "-1"], "--iterations must be an integer >= 1"),
    (["--warmup-epochs", "-1"], "--warmup-epochs must be an integer >= 0"),
    (["--rft", "student_init=foo"], "student_init='foo' does not exist; choose one of: fft, previous"),
    (["--rft", "export=best"], "export='best' does not exist; choose one of: merged, fft"),
    (["--method", "lora", "--rft", "export=fft"], "--method lora trains no F_t and no retention terms"),
    (["--no-mirroring", "--mirror"], "models trained with --no-mirroring never saw"),
])
def test_bad_settings_are_refused_in_the_first_step(nnunet, tiny_foundation, extra, message):
    """Settings that would fail inside stage B or nnUNetv2_train are refused before planning, MDS or training."""
    proc = run(["medseqft", "run", "--foundation", str(tiny_foundation), "--datasets", "501", "502", "--name",
                "bad-settings", *extra], nnunet, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (nnunet.results / "medseqft_runs" / "bad-settings").exists()


def test_bad_run_name_and_method(nnunet, tiny_foundation):
    proc = run(["medseqft", "run", "--foundation", str(tiny_foundation), "--datasets", "501", "--name", "a__b"],
               nnunet, check=False)
    assert proc.returncode == 2 and "Bad run name" in proc.stderr


# ---------------------------------------------------------------- manifest guarantees (no training)

def test_manifest_refuses_other_settings_newer_format_and_survives_a_full_disk(tmp_path, monkeypatch):
    from nnunetv2_medseqft import jsonio
    from nnunetv2_medseqft.sequence.manifest import Manifest

    folder = str(tmp_path / "run")
    m = Manifest.open(folder, "r1", {"method": "medseqft", "seed": 0}, "medseqft run ...")
    m.start("plan/x", {"kind": "plan"})
    saved = Path(m.path).read_text()

    with pytest.raises(MedSeqFTError, match=r"other settings:\n  seed: stored 0, now 1"):
        Manifest.open(folder, "r1", {"method": "medseqft", "seed": 1}, "medseqft run ...")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(jsonio.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        m.finish("plan/x", time.time(), {})
    monkeypatch.undo()
    assert Path(m.path).read_text() == saved  # the previous manifest survives, no temporary file is left
    assert os.listdir(folder) == ["manifest.json"]

    data = json.loads(saved)
    data["version"] = 99
    Path(m.path).write_text(json.dumps(data))
    with pytest.raises(MedSeqFTError, match="newer than this nnunetv2-medseqft"):
        Manifest.open(folder, "r1", {"method": "medseqft", "seed": 0}, "")


def test_lock_keeps_a_second_process_off_the_run(tmp_path):
    from nnunetv2_medseqft.sequence.manifest import RunLock

    holder = subprocess.Popen([str(BIN / "python"), "-c", "import sys, time; from nnunetv2_medseqft.sequence.manifest import "
                               "RunLock; l = RunLock(sys.argv[1]).__enter__(); print('locked', flush=True); "
                               "time.sleep(60)", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(MedSeqFTError, match=f"in use by pid {holder.pid}"):
            RunLock(str(tmp_path)).__enter__()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(str(tmp_path)):  # released by the kernel when the holder died
        pass


# ---------------------------------------------------------------- real sequences

def test_medseqft_run_resumes_after_sigkill_without_touching_finished_work(nnunet, medseqft_run):
    name, model_folder, before, resumed = medseqft_run
    assert folder_hashes(model_folder) == before
    assert {"checkpoint_final.pth", "checkpoint_fft.pth", "previous_model.pth"} <= set(before)
    steps = manifest(nnunet, name)["steps"]
    assert all(s["status"] == "done" for s in steps.values())
    assert steps["train/Dataset501_MSFTLiver"]["attempts"] == 1  # never redone
    assert "step 1/" not in resumed.stdout  # finished steps are skipped silently
    assert "train/Dataset502_MSFTSpleen" in resumed.stdout
    assert "MDS: scoring" in resumed.stdout  # the select step shows what it does, not minutes of silence


def test_medseqft_run_results_are_in_range(nnunet, medseqft_run):
    name = medseqft_run[0]
    results = json.loads((nnunet.results / "medseqft_runs" / name / "results.json").read_text())
    assert results["tasks"] == ["Dataset501_MSFTLiver", "Dataset502_MSFTSpleen"]
    for d in results["tasks"]:
        for model in ("M", "F"):
            s = results["scores"][d][model]
            assert 0 <= s["mean"]["dice"] <= 100 and s["mean"]["hd95"] >= 0 and s["cases"] == 2
    r = results["R"]
    assert len(r["dice"]) == 3 and all(len(row) == 2 for row in r["dice"])
    assert all(0 <= v <= 100 for row in r["dice"] for v in row)
    # the diagonal is each task model on its own task: the same weights as scores[...]["M"]
    assert r["dice"][1][0] == pytest.approx(results["scores"]["Dataset501_MSFTLiver"]["M"]["mean"]["dice"])
    assert r["dice"][2][1] == pytest.approx(results["scores"]["Dataset502_MSFTSpleen"]["M"]["mean"]["dice"])
    summary = results["summary"]
    assert summary["acc"] == pytest.approx(sum(r["dice"][2]) / 2)
    assert summary["bwt"] == pytest.approx(r["dice"][2][0] - r["dice"][1][0])
    assert summary["fwt"] == pytest.approx(r["dice"][1][1] - r["dice"][0][1])
    # encoder-only R: the liver's own decoder and head under the spleen body's encoder
    enc = r["dice_encoder"]
    assert enc[0] == [None, None] and enc[1] == [r["dice"][1][0], None] and enc[2][1] == r["dice"][2][1]
    assert 0 <= enc[2][0] <= 100 and summary["bwt_encoder"] == pytest.approx(enc[2][0] - r["dice"][1][0])
    curves = results["curves"]["Dataset502_MSFTSpleen"]
    # rft budget=fft_full: stage A has the run's 4 epochs (as FFT alone), stage B its 2 on top
    assert len(curves["train_losses"]) == 6 and curves["stage_b_start"] == 4


def test_medseqft_first_task_takes_stage_a_from_the_m0_reference(nnunet, medseqft_run):
    """MedSeqFT's first stage A is full fine-tuning of M0 with the run's budget and seed: the shared M0 reference
    (the first task of seqFFT and parallel FFT) is trained once and given to the trainer, which trains stage B."""
    import torch

    from nnunetv2_medseqft.checkpoints import sha256_file

    name, model_folder = medseqft_run[:2]
    final = torch.load(model_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    reference = Path(resolved_paths(final["init_args"]["plans"]["medseqft"], nnunet)["fft_model"])
    assert reference.parent.parent.name.startswith("MedSeqFTFFTTrainer__MedSeqFTPlans-")
    assert ".fromM0-" in reference.parent.parent.name and reference.name == "checkpoint_final.pth"
    assert final["medseqft"]["fft_model"]["sha256"] == sha256_file(str(reference))
    fft = torch.load(model_folder / "checkpoint_fft.pth", map_location="cpu", weights_only=False)
    given = torch.load(reference, map_location="cpu", weights_only=False)
    assert all(torch.equal(fft["network_weights"][k], v) for k, v in given["network_weights"].items())
    assert final["logging"]["train_losses"][:4] == given["logging"]["train_losses"]  # stage A's log is the reference's
    # the second task starts from M_1, not from M0: its stage A is trained in its own folder
    second = Path(manifest(nnunet, name)["steps"]["train/Dataset502_MSFTSpleen"]["outputs"]["model"]["path"])
    plans = torch.load(second, map_location="cpu", weights_only=False)["init_args"]["plans"]
    assert "fft_model" not in plans["medseqft"]


@pytest.mark.parametrize("method, extra, expected", [
    ("medseqft", [], ["True", "False"]), ("random-buffer", [], ["True", "False"]),
    ("medseqft", ["--rft", "budget=split"], ["False", "False"]),  # stage A shorter than the budget: its own
    ("seqfft", [], ["False", "False"]), ("lora", [], ["False", "False"]),
])
def test_which_runs_take_their_first_stage_a_from_the_m0_reference(nnunet, tiny_foundation, method, extra, expected):
    name = f"t-stage-a-{method}-{len(extra)}"
    code = runner_code(run_cmd(tiny_foundation, name, method, *extra), nnunet.root / name, """
from nnunetv2_medseqft.sequence.manifest import SHARED_STAGE_A
manifest.data[SHARED_STAGE_A] = True
runner = new_runner()
print(*(runner._stage_a_is_m0_reference(d) for d in runner.request.datasets))
del manifest.data[SHARED_STAGE_A]  # a run begun before the sharing trains its own
print(new_runner()._stage_a_is_m0_reference(runner.request.datasets[0]))
""")
    assert run_python(code, nnunet).stdout.split()[-3:] == [*expected, "False"]


def test_changed_settings_are_refused_for_an_existing_run(nnunet, tiny_foundation, medseqft_run):
    name = medseqft_run[0]
    before = (nnunet.results / "medseqft_runs" / name / "manifest.json").read_bytes()
    proc = run(run_cmd(tiny_foundation, name, "medseqft", "--seed", "3"), nnunet, check=False)
    assert proc.returncode == 2 and "exists with other settings" in proc.stderr and "seed" in proc.stderr
    assert "--seed 3" not in proc.stderr  # the hint repeats the run's own command, not the refused one
    assert "with --rft" in proc.stderr and "student_init=previous" in proc.stderr  # the readings it was trained under
    assert (nnunet.results / "medseqft_runs" / name / "manifest.json").read_bytes() == before


def test_seqfft_run_with_unseen_task_then_report_and_compare(nnunet, tiny_foundation, medseqft_run):
    cmd = run_cmd(tiny_foundation, "t-seqfft", "seqfft", "--unseen", "505")
    run(cmd, nnunet)
    runs = nnunet.results / "medseqft_runs"
    results = json.loads((runs / "t-seqfft" / "results.json").read_text())
    assert "F" not in results["scores"]["Dataset501_MSFTLiver"]
    unseen = results["unseen_scores"]["Dataset505_MSFTLiverLesion"]
    assert 0 <= unseen["from_run"]["mean"]["dice"] <= 100 and 0 <= unseen["from_m0"]["mean"]["dice"] <= 100
    # the unseen task trained from the final body and from M0 into separate nnU-Net results folders
    models = {Path(p).parent.parent.name for p in (
        manifest(nnunet, "t-seqfft")["steps"]["unseen/Dataset505_MSFTLiverLesion/from-run"]["outputs"]["model"]["path"],
        manifest(nnunet, "t-seqfft")["steps"]["unseen/Dataset505_MSFTLiverLesion/from-M0"]["outputs"]["model"]["path"])}
    assert "MedSeqFTFFTTrainer__MedSeqFTPlans_t-seqfft__3d_fullres" in models
    # the M0 reference is keyed by foundation, budget, seed and fold, not by run: runs that agree share it
    assert any(m.startswith("MedSeqFTFFTTrainer__MedSeqFTPlans-") and ".fromM0-" in m for m in models)
    # seqFFT's first task is full fine-tuning of M0 too: the reference's folder; its second task the run's own
    steps = manifest(nnunet, "t-seqfft")["steps"]
    first, second = (Path(steps[f"train/{d}"]["outputs"]["model"]["path"]) for d in
                     ("Dataset501_MSFTLiver", "Dataset502_MSFTSpleen"))
    reference_plans = next(m for m in models if ".fromM0-" in m).split("__")[1]
    assert first.parent.parent.name.split("__")[1] == reference_plans
    assert second.parent.parent.name == "MedSeqFTFFTTrainer__MedSeqFTPlans_t-seqfft__3d_fullres"

    out = nnunet.root / "report"
    run(["medseqft", "report", "t-medseqft", "t-seqfft", "--out", str(out)], nnunet)
    text = (out / "report.md").read_text()
    assert "seqfft" in text and "medseqft" in text
    assert (out / "dice_per_task.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "unseen_transfer.png").is_file()
    # one segmentation figure per task (validation slice, ground truth, prediction), all of one pixel size
    for task in ("Dataset501_MSFTLiver", "Dataset502_MSFTSpleen"):
        assert (runs / "t-medseqft" / "overlays" / f"{task}.npz").is_file()
    figures = sorted(out.glob("overlay_t-medseqft_*.png")) + sorted(out.glob("overlay_t-seqfft_*.png"))
    assert len(figures) == 4, figures
    for png in figures:
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and png.name in text
        assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == (900, 320)
    per_case = results["scores"]["Dataset501_MSFTLiver"]["M"]["per_case"]
    assert len(per_case) == 2 and all(0 <= v <= 100 for v in per_case.values() if v is not None)
    assert "Dice per acquisition site" in text

    # a run of another method, with readings (--rft) of its own, shares this M0 reference: it is full fine-tuning of
    # M0, whichever run trained it (checked in a fresh process, as a run checks its model folders before it trains)
    code = runner_code(run_cmd(tiny_foundation, "t-share", "medseqft", "--unseen", "505", "--rft", "buffer=random"),
                       nnunet.root / "t-share", """
runner = new_runner()
runner._check_model_folders()
print(runner._plans_name(from_m0=True))
""")
    proc = run_python(code, nnunet)
    assert proc.stdout.split()[-1] in {Path(m).name.split("__")[1] for m in models}, proc.stdout
    # parallel FFT (every task from M0) would take seqFFT's first task as its own and train only the second;
    # a run begun before the sharing (no mark in its manifest) keeps its tasks in its own folders
    code = runner_code(run_cmd(tiny_foundation, "t-parallel", "parallel"), nnunet.root / "t-parallel", """
from nnunetv2_medseqft.sequence.manifest import SHARED_M0_TASKS
manifest.data[SHARED_M0_TASKS] = True
runner = new_runner()
print(runner._task_model("Dataset501_MSFTLiver"), runner._task_model("Dataset502_MSFTSpleen"))
del manifest.data[SHARED_M0_TASKS]
print(new_runner()._task_model("Dataset501_MSFTLiver"))
""")
    shared_first, shared_second, own_first = run_python(code, nnunet).stdout.split()[-3:]
    assert Path(shared_first) == first and Path(shared_second).parent.parent.name.split("__")[1] == reference_plans
    assert Path(own_first).parent.parent.name == "MedSeqFTFFTTrainer__MedSeqFTPlans_t-parallel__3d_fullres"
    table = run(["medseqft", "compare", "t-medseqft", "t-seqfft"], nnunet).stdout
    assert "| medseqft" in table and "| seqfft" in table


def test_models_of_a_deleted_run_are_not_taken_for_another_settings_run(nnunet, tiny_foundation, medseqft_run):
    """Same name, run folder gone, other seed: the model folders still hold the old run's models."""
    import shutil

    name = medseqft_run[0]
    model = manifest(nnunet, name)["steps"]["train/Dataset501_MSFTLiver"]["outputs"]["model"]["path"]
    before = Path(model).read_bytes()
    moved = nnunet.root / "moved-run"
    shutil.move(str(nnunet.results / "medseqft_runs" / name), moved)
    try:
        proc = run(run_cmd(tiny_foundation, name, "medseqft", *PACKABLE, "--seed", "5"), nnunet, check=False)
        # the MDS seed follows the run's seed, and the first stage A is the M0 reference of that seed
        assert proc.returncode == 2 and "trained with other settings (fft_model, mds, seed differ)" in proc.stderr, \
            proc.stderr
        assert "cannot get past this" in proc.stdout  # not a bare "Resume with": the same command fails again
        assert Path(model).read_bytes() == before
    finally:
        shutil.rmtree(nnunet.results / "medseqft_runs" / name, ignore_errors=True)
        shutil.move(str(moved), nnunet.results / "medseqft_runs" / name)


# ---------------------------------------------------------------- child errors, attempts, finished records

def test_child_failure_names_the_first_error_and_whether_resuming_helps(tmp_path):
    from nnunetv2_medseqft.sequence.train_process import child_failure

    log = tmp_path / "train.log"
    log.write_text("epoch 0\nTraceback (most recent call last):\n  File \"loader.py\", line 3, in load\n"
                   "AssertionError: Images contains NaN values\n\nTraceback (most recent call last):\n"
                   "  File \"nnUNetTrainer.py\", line 9\nRuntimeError: One or more background workers are no longer "
                   "alive. Exiting. Please check the print statements above for the actual error message\n")
    crash = child_failure(["nnUNetv2_train", "501"], 1, str(log), log.read_text().splitlines())
    assert "First error in its log: AssertionError: Images contains NaN values" in str(crash)
    assert f"Log: {log}" in str(crash) and crash.resumable
    log.write_text("Traceback (most recent call last):\n  File \"x.py\"\nnnunetv2_medseqft.errors.MedSeqFTError: "
                   "LoRA rank 9 exceeds ...\n")
    refused = child_failure(["nnUNetv2_train", "501"], 1, str(log), [])
    assert "LoRA rank 9 exceeds" in str(refused) and not refused.resumable


def test_an_earlier_attempt_is_kept_not_replaced(tmp_path):
    from nnunetv2_medseqft.sequence.train_process import keep_previous_attempt

    log = tmp_path / "02_train_x.log"
    assert keep_previous_attempt(str(log)) is None
    for text in ("first", "second"):
        log.write_text(text)
        keep_previous_attempt(str(log))
    assert not log.exists()
    assert (tmp_path / "02_train_x.attempt1.log").read_text() == "first"
    assert (tmp_path / "02_train_x.attempt2.log").read_text() == "second"
    folder = tmp_path / "fold_0"
    folder.mkdir()
    (folder / "checkpoint_fft.pth").write_bytes(b"F_t")
    assert keep_previous_attempt(str(folder)) == str(tmp_path / "fold_0.attempt1")
    assert (tmp_path / "fold_0.attempt1" / "checkpoint_fft.pth").read_bytes() == b"F_t"


def test_short_budgets_write_checkpoint_latest_often_enough_to_continue():
    from types import SimpleNamespace

    from nnunetv2_medseqft.plugin.variants import apply_budget

    for epochs, expected in ((16, 1), (100, 10), (1000, 50)):
        trainer = SimpleNamespace(save_every=50, num_epochs=1000)  # nnU-Net's defaults
        apply_budget(trainer, {"num_epochs": epochs})
        assert trainer.num_epochs == epochs and trainer.save_every == expected
    trainer = SimpleNamespace(save_every=50, num_epochs=1000)
    apply_budget(trainer, {"num_epochs": 16, "save_every": 8})
    assert trainer.save_every == 8


def test_mirroring_is_a_budget_switch_and_the_cpu_scale_turns_it_off():
    from types import SimpleNamespace

    from nnunetv2_medseqft.plugin.variants import apply_budget
    from nnunetv2_medseqft.scales import get_scale

    trainer = SimpleNamespace(save_every=50, num_epochs=1000, mirroring=1)
    apply_budget(trainer, {"mirroring": 0})
    assert trainer.mirroring == 0
    with pytest.raises(MedSeqFTError, match="mirroring must be 0 or 1, got 2"):
        apply_budget(trainer, {"mirroring": 2})
    # the generated abdomen has sides: its CPU scales train without mirroring, the unit-test scale as nnU-Net does
    assert "--no-mirroring" in get_scale("cpu").budget_args() and "--no-mirroring" in get_scale("cpu-resenc").budget_args()
    assert "--no-mirroring" not in get_scale("tiny").budget_args()


@pytest.mark.parametrize("scale,transfer,mirroring", [("cpu", "encoder", False), ("cpu-resenc", "encoder", False),
                                                      ("tiny", "full", True)])
def test_a_scales_recipe_is_what_medseqft_run_parses(scale, transfer, mirroring):
    """The benchmarks and the demo pass ``Scale.budget_args()`` to ``medseqft run``: its parser must read them as
    the scale says (the CPU scales start from M0's encoder: their MIM decoder's last stage is dead for segmentation)."""
    from nnunetv2_medseqft.cli.main import build_parser
    from nnunetv2_medseqft.scales import get_scale

    s = get_scale(scale)
    args = build_parser().parse_args(["run", "--foundation", "F", "--datasets", "501", "--name", "r",
                                        *s.budget_args()])
    assert args.m0_transfer == transfer and args.no_mirroring == (not mirroring)
    assert (args.epochs, args.iterations, args.val_iterations) == (s.epochs, s.iterations, s.val_iterations)


def test_a_same_size_change_of_a_finished_output_is_caught(tmp_path):
    from nnunetv2_medseqft.sequence.manifest import Manifest, file_record

    out = tmp_path / "buffer.json"
    out.write_text('{"buffer": ["case_001"]}')
    m = Manifest.open(str(tmp_path / "run"), "r1", {"seed": 0}, "medseqft run ...")
    m.finish("select/x", m.start("select/x", {"kind": "select"}), {"buffer": file_record(str(out))})
    m.check_done_outputs("select/x")
    out.write_text('{"buffer": ["case_002"]}')  # same size, other content
    with pytest.raises(MedSeqFTError, match="changed content"):
        m.check_done_outputs("select/x")


def test_select_never_overwrites_the_buffer_a_run_recorded(nnunet, medseqft_run):
    name = medseqft_run[0]
    recorded = manifest(nnunet, name)["steps"]["select/Dataset501_MSFTLiver"]["outputs"]["buffer"]
    buffer = Path(recorded["path"])
    before, manifest_before = buffer.read_bytes(), (nnunet.results / "medseqft_runs" / name / "manifest.json").read_bytes()
    proc = run(["medseqft", "select", "-d", "501", "-f", "0", "-p", f"MedSeqFTPlans_{name}", "--k", "1"], nnunet,
               check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"MDS buffer of run(s) {name}" in proc.stderr and "Nothing was written" in proc.stderr
    assert buffer.read_bytes() == before
    assert (nnunet.results / "medseqft_runs" / name / "manifest.json").read_bytes() == manifest_before


def test_mds_status_lines_give_draws_and_an_eta():
    from nnunetv2_medseqft.method.mds import _StatusLines

    lines = []
    status = _StatusLines(lines.append, every=0.0)
    time.sleep(0.01)
    status(40, 100, "3/8 cases settled")
    assert len(lines) == 1 and lines[0].startswith("MDS: 3/8 cases settled, 40 draws, ") and "ETA <= " in lines[0]
    _StatusLines(None, every=0.0)(1, 2, "x")  # no report: silent


def test_an_unwritable_results_folder_is_refused_before_any_work(nnunet, tiny_foundation):
    env_root = "/sys/fs/medseqft_results"  # a read-only mount: refused even for root
    proc = subprocess.run([str(BIN / "medseqft"), "run", "--foundation", str(tiny_foundation), "--datasets", "501",
                           "--name", "ro"], env={**nnunet.env(), "nnUNet_results": env_root}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and f"$nnUNet_results ({env_root}) is not writable" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_gpu_saved_start_model_is_handed_to_nnunet_as_a_cpu_copy(tmp_path, tiny_foundation, monkeypatch):
    """nnU-Net's -pretrained_weights loader has no map_location: a GPU-saved foundation fails on a CPU machine."""
    import torch
    import torch.serialization

    from nnunetv2_medseqft.checkpoints import atomic_torch_save, load_checkpoint_file, loadable_here, saved_devices

    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    ckpt = load_checkpoint_file(str(tiny_foundation))
    gpu = tmp_path / "gpu_saved.pth"
    with monkeypatch.context() as m:  # the location tags torch.save writes for tensors on a GPU
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(ckpt, gpu)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(gpu, weights_only=False)  # what nnU-Net's loader does
    copy = loadable_here(str(gpu), str(tmp_path / "start_models"))
    assert copy != str(gpu) and saved_devices(copy) == {"cpu"}
    weights = torch.load(copy, weights_only=False)["network_weights"]
    assert all(torch.equal(weights[k], v) for k, v in ckpt["network_weights"].items())
    assert loadable_here(copy, str(tmp_path / "again")) == copy
    mine = tmp_path / "ours.pth"
    atomic_torch_save(ckpt, str(mine))
    assert saved_devices(str(mine)) == {"cpu"}


def test_a_run_copied_with_its_nnunet_roots_still_finds_its_files(nnunet, medseqft_run, tmp_path, monkeypatch):
    """Recorded paths are relative to the nnU-Net root they lie in: a colleague's copy (or a new disk) works."""
    import shutil

    from nnunetv2_medseqft.paths import portable, resolved
    from nnunetv2_medseqft.sequence.manifest import Manifest
    from nnunetv2_medseqft.sequence.run_record import read_run, task_models

    name = medseqft_run[0]
    raw = json.loads((nnunet.results / "medseqft_runs" / name / "manifest.json").read_text())
    recorded = [rec["path"] for step in raw["steps"].values() for rec in (step.get("outputs") or {}).values()
                if isinstance(rec, dict) and "path" in rec]
    assert recorded and all(p.startswith(("$nnUNet_results/", "$nnUNet_preprocessed/")) for p in recorded), recorded
    copy = {var: tmp_path / var for var in ("nnUNet_results", "nnUNet_preprocessed", "nnUNet_raw")}
    shutil.copytree(nnunet.results / "medseqft_runs" / name, copy["nnUNet_results"] / "medseqft_runs" / name)
    for path in recorded + [raw["foundation"]["path"]]:
        var, _, rest = path[1:].partition("/")
        original = {"nnUNet_results": nnunet.results, "nnUNet_preprocessed": nnunet.preprocessed}[var] / rest
        (copy[var] / rest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(original, copy[var] / rest)
    for var, folder in copy.items():
        monkeypatch.setenv(var, str(folder))
    folder, data = read_run(name)
    assert all(str(p).startswith(str(tmp_path)) for _, p in task_models(data))
    m = Manifest(folder, data)
    for key in data["steps"]:
        m.check_done_outputs(key)  # size and sha256 of the copies
    assert portable(str(copy["nnUNet_results"] / "a" / "b.pth")) == "$nnUNet_results/a/b.pth"
    assert resolved("$nnUNet_results/a/b.pth") == str(copy["nnUNet_results"] / "a" / "b.pth")
    assert portable("/elsewhere/x.pth") == "/elsewhere/x.pth" == resolved("/elsewhere/x.pth")


def test_a_moved_run_resumes_an_interrupted_training_and_evaluates_into_another_folder(nnunet, medseqft_run,
                                                                                         tiny_foundation, tmp_path):
    """A run killed inside a training, then moved with its nnU-Net roots to a new disk: the training continues there
    from its checkpoint_latest.pth (its plans record M_(t-1) as ``$nnUNet_results/...``), and ``evaluate --out``
    only reads the run folder."""
    import shutil
    import signal

    from nnunet_helpers import NnunetFolders

    from nnunetv2_medseqft.sequence.layout import LOCK_FILE

    name, task = medseqft_run[0], "Dataset502_MSFTSpleen"
    first = NnunetFolders(tmp_path / "disk1")
    shutil.copytree(nnunet.raw, first.raw)
    shutil.copytree(nnunet.preprocessed, first.preprocessed)
    for folder in [nnunet.results / "medseqft_runs" / name, tiny_foundation.parent.parent.parent,
                   *nnunet.results.glob(f"Dataset50[12]_*/*__MedSeqFTPlans_{name}__*")]:
        shutil.copytree(folder, first.results / folder.relative_to(nnunet.results))
    path = first.results / "medseqft_runs" / name / "manifest.json"
    raw = json.loads(path.read_text())
    checkpoint = Path(manifest(first, name)["steps"][f"train/{task}"]["outputs"]["model"]["path"])
    del raw["steps"][f"train/{task}"]  # task 2 is trained again, and killed inside its training
    path.write_text(json.dumps(raw))
    shutil.rmtree(checkpoint.parent)
    foundation = tiny_foundation.relative_to(nnunet.results)
    cmd = run_cmd(first.results / foundation, name, "medseqft", *PACKABLE)
    proc = subprocess.Popen([str(BIN / cmd[0])] + cmd[1:], env=first.env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 900
    latest = checkpoint.parent / "checkpoint_latest.pth"
    while time.time() < deadline and proc.poll() is None and not latest.is_file():
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before its training wrote checkpoint_latest.pth"
    time.sleep(1)  # the checkpoint is written atomically; let the file land
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    plans = json.loads((checkpoint.parent.parent / "plans.json").read_text())
    assert plans["medseqft"]["previous_model"].startswith("$nnUNet_results/"), plans["medseqft"]

    copy = NnunetFolders(tmp_path / "disk2")
    shutil.move(first.root, copy.root)  # the new disk; the old path no longer exists
    resumed = run(run_cmd(copy.results / foundation, name, "medseqft", *PACKABLE), copy)
    moved = copy.results / checkpoint.relative_to(first.results)
    assert moved.is_file() and not (moved.parent / "checkpoint_latest.pth").exists()
    assert any(line.strip().startswith(f"task 2/2 {task}") and line.rstrip().endswith("--c")
               for line in resumed.stdout.splitlines()), resumed.stdout  # continued, not restarted

    run_folder = copy.results / "medseqft_runs" / name
    before = {k: v for k, v in folder_hashes(run_folder).items() if k != LOCK_FILE}
    out = tmp_path / "scores"
    proc = run(["medseqft", "evaluate", name, "--out", str(out)], copy)
    results = json.loads((out / "results.json").read_text())
    assert set(results["scores"]) == {"Dataset501_MSFTLiver", task}, results["scores"].keys()
    assert results["R"] is not None and str(out) in proc.stdout
    assert {k: v for k, v in folder_hashes(run_folder).items() if k != LOCK_FILE} == before
    inside = run(["medseqft", "evaluate", name, "--out", str(run_folder / "x")], copy, check=False)
    assert inside.returncode == 2 and "lies inside the run folder" in inside.stderr, inside.stderr


def test_m0_transfer_encoder_starts_from_m0s_encoder_and_a_fresh_decoder(nnunet, tiny_foundation):
    import torch

    from nnunetv2_medseqft.method.foundation import load_foundation, start_from_foundation

    name = "t-encoder-start"
    run(["medseqft", "run", "--foundation", str(tiny_foundation), "--datasets", "501", "--method", "parallel",
         "--name", name, "--epochs", "2", "--iterations", "2", "--val-iterations", "1", "--m0-transfer", "encoder"],
        nnunet)
    folder = nnunet.results / "medseqft_runs" / name
    assert manifest(nnunet, name)["settings"]["m0_transfer"] == "encoder"
    # parallel's task is full fine-tuning of M0: the shared reference's folder, recorded in the manifest
    start = Path(manifest(nnunet, name)["steps"]["train/Dataset501_MSFTLiver"]["outputs"]["model"]["path"]).parent
    assert ".fromM0-" in start.parent.name
    loaded = torch.load(start / "previous_model.pth", map_location="cpu", weights_only=False)["network_weights"]
    m0 = torch.load(tiny_foundation, map_location="cpu", weights_only=False)["network_weights"]
    encoder = [k for k in loaded if k.startswith("encoder.")]
    decoder = [k for k in loaded if k.startswith("decoder.stages.")]
    assert encoder and decoder
    assert all(torch.equal(loaded[k], m0[k]) for k in encoder), "the encoder is M0's"
    assert not any(torch.equal(loaded[k], m0[k]) for k in decoder if loaded[k].dim() > 1), "the decoder is fresh"
    # the derived start is seeded: the same foundation and seed give the same weights
    again = start_from_foundation(load_foundation(str(tiny_foundation)), "encoder", 0, str(folder / "again.pth"))
    first = torch.load(folder / "start_models" / "m0_encoder_s0.pth", map_location="cpu", weights_only=False)
    second = torch.load(again, map_location="cpu", weights_only=False)
    assert all(torch.equal(v, second["network_weights"][k]) for k, v in first["network_weights"].items())
    proc = run(["medseqft", "run", "--foundation", str(tiny_foundation), "--datasets", "501", "--method", "parallel",
                "--name", name, "--epochs", "2", "--iterations", "2", "--val-iterations", "1"], nnunet, check=False)
    assert proc.returncode == 2 and "m0_transfer" in proc.stderr, "resuming with another transfer is refused"


def test_a_foundation_with_an_inactive_last_stage_is_named_before_a_full_transfer(tiny_foundation, tmp_path, capsys):
    """What made tasks from M0 in full miss the spleen at the CPU scale: the channels a segmentation head reads sit
    in LeakyReLU's negative slope. medseqft run warns (and goes on) when at least half of them do."""
    import torch

    from nnunetv2_medseqft.cli.run import warn_inactive_head_inputs
    from nnunetv2_medseqft.method.foundation import inactive_head_inputs, load_foundation, start_from_foundation

    ckpt = torch.load(tiny_foundation, map_location="cpu", weights_only=False)
    last = max(int(k.split(".")[2]) for k in ckpt["network_weights"] if k.startswith("decoder.stages."))
    norm = [k for k in ckpt["network_weights"] if k.startswith(f"decoder.stages.{last}.") and k.endswith("norm.bias")][-1]
    bias = ckpt["network_weights"][norm]
    channels = bias.numel()
    bias[: channels // 2 + 1] = -5.0 * ckpt["network_weights"][norm[:-len("bias")] + "weight"][: channels // 2 + 1].abs()
    bias[channels // 2 + 1:] = 0.0
    dead = tmp_path / "dead.pth"
    torch.save(ckpt, dead)
    assert inactive_head_inputs(load_foundation(str(dead))) == (channels // 2 + 1, channels)
    warn_inactive_head_inputs(str(dead))
    assert "--m0-transfer encoder" in capsys.readouterr().err
    fresh = start_from_foundation(load_foundation(str(tiny_foundation)), "random", 0, str(tmp_path / "random.pth"))
    assert inactive_head_inputs(load_foundation(fresh)) == (0, channels), "nnU-Net's init: gamma 1, beta 0"
    warn_inactive_head_inputs(fresh)
    assert capsys.readouterr().err == ""


def test_repeated_settings_flags_add_up():
    """--rft ... --rft ...: both sets count (a second flag silently replacing the first trained other settings)."""
    import argparse

    from nnunetv2_medseqft.cli.run import configure_parser

    parser = argparse.ArgumentParser()
    configure_parser(parser, "run")
    args = parser.parse_args(["--foundation", "F", "--datasets", "501", "--name", "n", "--rft", "lora_rank=4",
                              "--mds", "repeats=8", "--rft", "student_init=previous", "--mds", "k=3"])
    assert args.rft == ["lora_rank=4", "student_init=previous"] and args.mds == ["repeats=8", "k=3"]
