"""The fidelity benchmark without training: its archive (what lets the protocol continue on another machine) and tables."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import bench_fidelity as bf  # noqa: E402

FOLDER = "Dataset500_MSFTPool/MedSeqFTPretrainTrainer_cpu__MedSeqFTCPUPlans__3d_fullres"


def fake_foundation(workdir: Path, weights: bytes) -> Path:
    folder = workdir / "nnUNet_results" / FOLDER
    (folder / "fold_all").mkdir(parents=True)
    for name in bf.FOUNDATION_FILES:
        (folder / name).write_bytes(weights if name.endswith(".pth") else b"{}")
    return folder / "fold_all" / "checkpoint_final.pth"


def test_archived_foundation_is_restored_elsewhere_and_another_one_is_refused(tmp_path):
    archive = tmp_path / "archive"
    f = fake_foundation(tmp_path / "w1", b"M0")
    digest = bf.archive_foundation(archive, tmp_path / "w1", f)
    bf.restore_foundation(archive, tmp_path / "w2")  # a new machine: the same M0, not a new pre-training
    restored = tmp_path / "w2" / "nnUNet_results" / FOLDER / "fold_all" / "checkpoint_final.pth"
    assert restored.read_bytes() == b"M0" and bf.archive_foundation(archive, tmp_path / "w2", restored) == digest
    other = fake_foundation(tmp_path / "w3", b"another M0")
    with pytest.raises(SystemExit, match="is not the foundation archived"):
        bf.archive_foundation(archive, tmp_path / "w3", other)
    assert (archive / "foundation" / "fold_all" / "checkpoint_final.pth").read_bytes() == b"M0"


def test_a_finished_run_is_archived_whole_and_counts_as_done(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    name = bf.run_name("medseqft", 0, "1")
    run = tmp_path / "results" / "medseqft_runs" / name
    (run / "overlays").mkdir(parents=True)
    (run / "results.json").write_text('{"format": "medseqft-results"}')
    (run / "manifest.json").write_text('{"steps": {}}')
    (run / "overlays" / "Dataset501_MSFTLiver.npz").write_bytes(b"npz")
    (run / "big_model.pth").write_bytes(b"weights")  # models stay in the workdir
    archive = tmp_path / "archive"
    assert not bf._archived(archive, name)
    bf.archive_run(archive, name, "abc")
    kept = archive / "runs" / name
    assert bf._archived(archive, name) and not (kept / "big_model.pth").exists()
    assert (kept / "overlays" / "Dataset501_MSFTLiver.npz").read_bytes() == b"npz"
    assert '"foundation_sha256": "abc"' in (kept / "archive.json").read_text()
    assert not list(archive.glob("runs/*.partial"))


def fake_run(folder: Path, task_dice: dict, seconds: float = 60.0, epochs: int = 2) -> str:
    """results.json and manifest.json of a finished run: task -> (Dice of M_t, Dice of F_t or None)."""
    folder.mkdir(parents=True)
    scores = {t: {"M": {"mean": {"dice": m}}, **({"F": {"mean": {"dice": f}}} if f is not None else {})}
              for t, (m, f) in task_dice.items()}
    curves = {t: {"train_losses": [0.0] * epochs} for t in task_dice}
    (folder / "results.json").write_text(json.dumps({"scores": scores, "curves": curves}))
    steps = {f"train/{t}": {"seconds": seconds} for t in task_dice}
    steps.update({f"select/{t}": {"seconds": 6.0} for t in task_dice} if epochs > 2 else {})
    (folder / "manifest.json").write_text(json.dumps({"steps": steps}))
    return str(folder)


def test_decomposition_splits_medseqft_minus_parallel_into_chain_history_and_stage_b(tmp_path):
    runs = {("parallel", "0"): fake_run(tmp_path / "p", {"A": (80.0, None), "B": (60.0, None)}),
            ("seqfft", "0"): fake_run(tmp_path / "s", {"A": (80.0, None), "B": (66.0, None)}),
            ("medseqft", "0"): fake_run(tmp_path / "m", {"A": (81.0, 82.0), "B": (63.0, 68.0)}, 90.0, 3)}
    parts = bf.decomposition(runs)
    assert parts["chain_seqfft_minus_parallel"] == {0: 3.0}  # (80 + 66 - 80 - 60) / 2
    assert parts["history_medseqft_ft_minus_seqfft"] == {0: 2.0}  # (82 + 68 - 80 - 66) / 2
    assert parts["stage_b_medseqft_mt_minus_ft"] == {0: -3.0}  # (81 + 63 - 82 - 68) / 2
    assert sum(v[0] for v in parts.values()) == 2.0  # = MedSeqFT - parallel FFT: (81 + 63 - 80 - 60) / 2
    per_task = bf.per_task_dice(runs)
    assert per_task["medseqft F_t"] == {"A": 82.0, "B": 68.0} and "seqfft F_t" not in per_task
    assert "| medseqft F_t | 82.0 | 68.0 |" in bf.per_task_table(per_task)
    compute = bf._compute([runs[("medseqft", "0")]], epochs=3, iterations=10)
    assert compute["task_iterations"] == 30 and compute["task_minutes"] == 1.6  # (90 + 6) s per task
    del runs[("seqfft", "0")]  # a seed without every method is left out, not half-counted
    assert bf.decomposition(runs)["stage_b_medseqft_mt_minus_ft"] == {}


def test_each_benchmark_method_maps_onto_its_medseqft_run_budget(tmp_path):
    from argparse import Namespace

    args = Namespace(fold="1", tasks=4, unseen=2, epochs=24, iterations=50, val_iterations=10, mds_repeats=64,
                     device="cpu", scale="cpu")
    def flag(cmd, name, n=1):
        i = cmd.index(name)
        return cmd[i + 1:i + 1 + n] if n > 1 else cmd[i + 1]

    medseqft = bf.method_command(args, tmp_path / "m0.pth", "medseqft", 0)
    assert flag(medseqft, "--epochs") == "24" and flag(medseqft, "--unseen", 2) == ["505", "506"]
    matched = bf.method_command(args, tmp_path / "m0.pth", "parallel-matched", 0)
    assert flag(matched, "--method") == "parallel" and flag(matched, "--epochs") == "31"  # stages A + B of MedSeqFT
    assert "--unseen" not in matched
    multitask = bf.method_command(args, tmp_path / "m0.pth", "multitask", 0)
    assert flag(multitask, "--epochs") == "96" and "--unseen" not in multitask  # the four task models' budget
    assert flag(multitask, "--datasets", 4) == ["501", "502", "503", "504"]


def test_multitask_compute_per_task_is_its_one_training_shared_by_the_tasks_it_scores(tmp_path):
    folder = tmp_path / "multitask"
    folder.mkdir()
    scores = {t: {"M": {"mean": {"dice": 80.0}}} for t in ("A", "B", "C", "D")}
    (folder / "results.json").write_text(json.dumps({"scores": scores, "curves": {"Union": {"train_losses": [0.0] * 8}}}))
    (folder / "manifest.json").write_text(json.dumps({"steps": {"union": {"seconds": 5.0},
                                                                "train/union": {"seconds": 240.0}}}))
    compute = bf._compute([str(folder)], epochs=2, iterations=10)
    assert compute["iterations"] == 80 and compute["task_iterations"] == 20 and compute["task_minutes"] == 1.0
