"""The fidelity benchmark's archive: what lets its protocol continue on another machine (no training here)."""

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
