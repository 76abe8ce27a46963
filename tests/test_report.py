"""``medseqft report`` / ``compare``: tables, statistics and plots from fabricated ``results.json`` files."""

import argparse
import json
import math
from pathlib import Path

import pytest

from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.reports import report
from nnunetv2_medseqft.sequence.layout import RESULTS_FILE, resolve_run

TASKS = ["Dataset501_MSFTLiver", "Dataset502_MSFTSpleen"]
UNSEEN = ["Dataset505_MSFTLiverLesion", "Dataset506_MSFTStomach"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fabricate(method: str, seed: int, dice: float, hd95: float = 5.0, acc: float = 80.0, unseen_run=(40.0, 50.0),
              unseen_m0=(35.0, 41.0)) -> dict:
    """A complete results.json; ``dice`` is every task model's mean Dice."""
    def scores(d, h):
        return {"mean": {"dice": d, "hd95": h}, "labels": {"organ": {"dice": d, "hd95": h}}, "cases": 2}

    return {
        "format": "medseqft-run-results/1",
        "run": f"{method}-s{seed}", "method": method, "seed": seed, "fold": 0,
        "tasks": TASKS, "unseen": UNSEEN,
        "scores": {t: {"M": scores(dice, hd95), "F": scores(dice - 1, hd95 + 1)} for t in TASKS},
        "R": {"rows": ["M0"] + TASKS, "cols": TASKS,
              "dice": [[12.0, 3.0], [80.0, 10.0], [75.0, 85.0]],
              "hd95": [[30.0, 40.0], [4.0, 20.0], [5.0, 3.5]],
              "dice_encoder": [[None, None], [80.0, None], [78.0, 85.0]]},
        "summary": {"acc": acc, "bwt": -5.0, "bwt_encoder": -2.0, "fwt": 7.0, "mean_dice": dice, "mean_hd95": hd95},
        "unseen_scores": {u: {"from_run": {"mean": {"dice": r, "hd95": 9.0}},
                              "from_m0": {"mean": {"dice": m, "hd95": 11.0}}}
                          for u, r, m in zip(UNSEEN, unseen_run, unseen_m0)},
        "curves": {t: {"train_losses": [1.0, 0.8, 0.6, 0.5], "val_losses": [1.1, 0.9, 0.7, None],
                       "ema_fg_dice": [0.1, 0.3, 0.5, 0.6], "stage_b_start": 2} for t in TASKS},
    }


def write_run(root: Path, name: str, results: dict) -> str:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / RESULTS_FILE).write_text(json.dumps(results))
    return resolve_run(str(folder))


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC), path


def run_cli(name: str, argv: list) -> int:
    parser = argparse.ArgumentParser()
    report.configure_parser(parser, name)
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def four_runs(tmp_path) -> list:
    """2 methods x 2 seeds with distinct values, so means and sds are checkable."""
    specs = [("medseqft", 0, 80.0, 4.0, 78.0, (40.0, 50.0)), ("medseqft", 1, 84.0, 6.0, 82.0, (44.0, 54.0)),
             ("seqfft", 0, 70.0, 8.0, 60.0, (30.0, 30.0)), ("seqfft", 1, 76.0, 10.0, 70.0, (32.0, 36.0))]
    return [write_run(tmp_path / "runs", f"{m}-s{s}", fabricate(m, s, d, h, a, u))
            for m, s, d, h, a, u in specs]


def test_compare_means_and_sds(four_runs, tmp_path, capsys):
    rows = report.compare_rows([report.load_results(f) for f in four_runs])
    assert list(rows) == ["medseqft", "seqfft"]
    dice = rows["medseqft"]["mean_dice"]
    assert dice["mean"] == pytest.approx(82.0) and dice["sd"] == pytest.approx(math.sqrt(8)) and dice["n"] == 2
    assert dice["per_seed"] == {0: 80.0, 1: 84.0}
    assert rows["seqfft"]["acc"]["mean"] == pytest.approx(65.0)
    assert rows["seqfft"]["acc"]["sd"] == pytest.approx(math.sqrt(50))
    # unseen: averaged over datasets per seed first -> medseqft run 45, 49; M0 always (35+41)/2 = 38
    assert rows["medseqft"]["unseen_run"]["per_seed"] == {0: 45.0, 1: 49.0}
    assert rows["medseqft"]["unseen_m0"]["mean"] == pytest.approx(38.0)
    assert rows["medseqft"]["unseen_gain"]["mean"] == pytest.approx(9.0)
    assert rows["seqfft"]["unseen_gain"]["per_seed"] == {0: -8.0, 1: -4.0}
    assert rows["seqfft"]["task_epochs"]["mean"] == pytest.approx(4.0)  # the curves' logged epochs per task

    out_md, out_json = tmp_path / "cmp.md", tmp_path / "cmp.json"
    assert run_cli("compare", four_runs + ["--out", str(out_md), "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "| medseqft | 2 | 82.0 ± 2.8 | 5.0 ± 1.4 | 80.0 ± 2.8 | -5.0 ± 0.0 | -2.0 ± 0.0 | 7.0 ± 0.0 | 47.0 ± 2.8 |" \
        in printed
    assert "| seqfft | 2 | 73.0 ± 4.2 |" in printed and "| Epochs / task |" in printed
    assert out_md.read_text().strip() == printed.strip()
    saved = json.loads(out_json.read_text())
    assert saved["seqfft"]["mean_hd95"]["mean"] == pytest.approx(9.0)
    assert saved["seqfft"]["mean_hd95"]["per_seed"] == {"0": 8.0, "1": 10.0}


def test_epochs_per_task_column_shows_what_a_task_costs(tmp_path):
    """MedSeqFT's stage B adds epochs to each task; a run scored before any training shows '-', not 0."""
    longer = fabricate("medseqft", 0, 80.0)
    longer["curves"][TASKS[1]]["train_losses"] = [1.0] * 6  # tasks of 4 and 6 epochs
    unscored = fabricate("seqfft", 0, 70.0) | {"curves": {}}
    rows = report.compare_rows([report.load_results(write_run(tmp_path, n, r))
                                for n, r in (("long", longer), ("unscored", unscored))])
    assert rows["medseqft"]["task_epochs"]["mean"] == pytest.approx(5.0)
    assert rows["seqfft"]["task_epochs"]["mean"] is None
    table = report.markdown_table(rows).splitlines()
    assert table[0].endswith("| Epochs / task |") and table[2].endswith("| 5.0 |") and table[3].endswith("| - |")


def test_duplicate_method_and_seed_refused(tmp_path):
    a = write_run(tmp_path, "first", fabricate("medseqft", 0, 80.0))
    b = write_run(tmp_path, "second", fabricate("medseqft", 0, 81.0) | {"run": "second"})
    with pytest.raises(MedSeqFTError, match=r"medseqft-s0.*second.*drop one"):
        run_cli("compare", [a, b])
    with pytest.raises(MedSeqFTError, match="drop one"):
        report.write_report([a, b], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_report_for_several_runs(four_runs, tmp_path, capsys):
    analysis = Path(four_runs[0]) / "analysis"
    analysis.mkdir()
    (analysis / "landscape.png").write_bytes(PNG_MAGIC + b"\0" * 2000)
    out = tmp_path / "report"

    assert run_cli("report", four_runs + ["-o", str(out)]) == 0
    assert str(out / "report.md") in capsys.readouterr().out
    text = (out / "report.md").read_text()

    assert "| medseqft | 2 | 82.0 ± 2.8 |" in text  # comparison table
    assert "| Dataset502_MSFTSpleen | F (stage A) | mean (2 cases) | 83.0 | 7.0 |" in text  # seed 1, F = M - 1
    assert "| after Dataset502_MSFTSpleen | 75.0 | 85.0 |" in text  # R matrix, Dice
    assert "| Dataset506_MSFTStomach | 36.0 | 41.0 | -5.0 |" in text  # seqfft seed 1 unseen transfer
    assert "BWT" in text and "R[T][j] - R[j][j]" in text

    expected = ["dice_per_task.png", "unseen_transfer.png"] + [
        f"{kind}_{m}-s{s}.png" for kind in ("r_matrix", "curves") for m in ("medseqft", "seqfft") for s in (0, 1)]
    for name in expected:
        assert_png(out / name)
        assert f"]({name})" in text
    assert "### Analysis" in text and "](../runs/medseqft-s0/analysis/landscape.png)" in text


def test_single_run_report_defaults_to_run_folder(tmp_path):
    folder = write_run(tmp_path, "solo", fabricate("lora", 3, 70.0))
    path = report.write_report([folder])
    assert path == str(Path(folder) / "report.md")
    text = Path(path).read_text()
    assert "| lora | 1 | 70.0 | 5.0 | 80.0 | -5.0 | -2.0 | 7.0 | 45.0 | 38.0 | 7.0 |" in text
    encoder = text.split("### R matrix, encoder only (Dice)")[1].split("###")[0]
    assert "78.0" in encoder and "BWT (encoder) -2.0" in text
    assert_png(Path(folder) / "r_matrix_lora-s3.png")


def test_several_runs_without_out_refused(four_runs):
    with pytest.raises(MedSeqFTError, match="--out"):
        run_cli("report", four_runs[:2])


def test_partial_results_render_dashes(tmp_path, capsys):
    """An unfinished run: no summary, no unseen scores, holes in scores, R and curves."""
    partial = {
        "format": "medseqft-run-results/1", "method": "parallel", "seed": None, "fold": 0,
        "tasks": TASKS, "unseen": UNSEEN,
        "scores": {TASKS[0]: {"M": {"mean": {"dice": 60.0, "hd95": None}, "labels": None}}},
        "R": {"rows": ["M0"] + TASKS, "cols": TASKS, "dice": [[12.0, None], [80.0, 10.0]], "hd95": None},
        "summary": None, "unseen_scores": {UNSEEN[0]: {"from_run": None}},
        "curves": {TASKS[0]: {"train_losses": [1.0, 0.9], "val_losses": None, "stage_b_start": None},
                   TASKS[1]: None},
    }
    folder = write_run(tmp_path, "unfinished", partial)
    out = tmp_path / "out"
    path = Path(report.write_report([folder], str(out)))
    text = path.read_text()

    assert "| parallel | 1 | - | - | - | - | - | - | - | - |" in text
    assert "| Dataset501_MSFTLiver | M (task model) | mean | 60.0 | - |" in text
    assert "| M0 | 12.0 | - |" in text and "| after Dataset502_MSFTSpleen | - | - |" in text
    assert "| Dataset505_MSFTLiverLesion | - | - | - |" in text
    assert "## Run unfinished" in text  # name taken from the folder
    for name in ("dice_per_task.png", "r_matrix_unfinished.png", "curves_unfinished.png"):
        assert_png(out / name)
    assert not (out / "unseen_transfer.png").exists() and "unseen_transfer.png" not in text

    assert run_cli("compare", [folder]) == 0
    assert "| parallel | 1 | - |" in capsys.readouterr().out


def test_bad_run_folders_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "manifest.json").write_text("{}")
    with pytest.raises(MedSeqFTError, match="no results.json yet"):
        report.write_report([resolve_run(str(tmp_path / "empty"))], str(tmp_path / "out"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / RESULTS_FILE).write_text("{not json")
    with pytest.raises(MedSeqFTError, match="not valid JSON"):
        run_cli("compare", [str(broken)])


def test_labels_give_variants_of_one_method_their_own_rows(tmp_path):
    """A benchmark's scratch and compute-matched controls are runs of method parallel with the same seed."""
    runs = [write_run(tmp_path, n, fabricate("parallel", 0, d) | {"run": n})
            for n, d in (("p", 80.0), ("scratch", 60.0))]
    with pytest.raises(MedSeqFTError, match="drop one"):
        report.write_report(runs, out=str(tmp_path / "refused"))
    path = report.write_report(runs, out=str(tmp_path / "labelled"), labels=["parallel", "scratch"])
    text = Path(path).read_text()
    assert "| parallel | 1 | 80.0 |" in text and "| scratch | 1 | 60.0 |" in text
