"""The open readings of K&G RFT (METHOD.md) as settings of the plans' ``medseqft.rft``: each changes what is
trained the way it says (real tiny nnUNetv2_train runs), and a reading that cannot apply is refused first."""

import json

import pytest
import torch
from conftest import FIRST_TASK_ID
from nnunet_helpers import run

from nnunetv2_medseqft.checkpoints import sha256_file, state_fingerprint
from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.method.settings import RFTSettings, key_value
from nnunetv2_medseqft.sequence.request import rft_resume_flags

TRAINER = "MedSeqFTTrainer_tiny"  # 4 epochs of 4 iterations, stage_b_fraction 0.5


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _plans(planned_task, name, foundation_path=None, training=None, **rft):
    """MedSeqFTPlans under another name (same data identifier, so the same preprocessed data) with rft settings."""
    plans = json.loads((planned_task.preprocessed / "MedSeqFTPlans.json").read_text())
    plans["plans_name"] = name
    plans["medseqft"]["rft"] = rft
    if training:  # the plans' medseqft.budget (rft has a key of that name: budget=split|fft_full)
        plans["medseqft"]["budget"] = training
    if foundation_path is not None:
        plans["medseqft"]["foundation"] = dict(plans["medseqft"]["foundation"], path=foundation_path)
    (planned_task.preprocessed / f"{name}.json").write_text(json.dumps(plans))
    return name


def _train(planned_task, plans, start, fold=0, check=True):
    proc = run(["nnUNetv2_train", str(FIRST_TASK_ID), "3d_fullres", str(fold), "-tr", TRAINER, "-p", plans,
                "-device", "cpu", "-pretrained_weights", str(start)], planned_task.folders, check=check)
    return proc, planned_task.folders.results / planned_task.dataset_name / f"{TRAINER}__{plans}__3d_fullres" / \
        f"fold_{fold}"


@pytest.fixture(scope="module")
def previous_model(tiny_foundation, tmp_path_factory):
    """An M_(t-1) that is not M0 (M0's body, perturbed): the foundation teacher must then differ from it."""
    ckpt = _load(tiny_foundation)
    gen = torch.Generator().manual_seed(0)
    ckpt["network_weights"] = {k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                               for k, v in ckpt["network_weights"].items()}
    path = tmp_path_factory.mktemp("previous") / "m_prev.pth"
    torch.save(ckpt, path)
    return path


def test_student_from_fft_foundation_teacher_and_full_fft_budget(planned_task, tiny_foundation, previous_model):
    # retention_every=1: with buffer samples drawn at random (share 0.5), the generalization term of every step
    # gives it 16 chances in 2 epochs to be computed (with the default 2, an epoch misses it ~1 run in 16)
    plans = _plans(planned_task, "MedSeqFTPlansReadA", student_init="fft", g_teacher="foundation", budget="fft_full",
                   g_layers="encoder", k_layers="encoder", retention_every=1)
    _, out = _train(planned_task, plans, previous_model)
    final, fft = _load(out / "checkpoint_final.pth"), _load(out / "checkpoint_fft.pth")
    section = final["medseqft"]
    # budget=fft_full: stage A has the trainer's 4 epochs (as FFT alone), stage B its 2 on top
    assert len(fft["logging"]["train_losses"]) == 4 and len(final["logging"]["train_losses"]) == 6
    assert len(final["logging"]["medseqft_k"]) == 2 and section["stage_a_epochs"] == 4
    # student_init=fft: the student began as F_t (LoRA's B = 0), not as M_(t-1) with F_t's head
    assert section["student_start"] == state_fingerprint(fft["network_weights"])
    assert section["student_start"] != state_fingerprint(_load(previous_model)["network_weights"])
    # g_teacher=foundation: the buffer teacher holds M0's weights, not M_(t-1)'s
    m0 = _load(tiny_foundation)["network_weights"]
    assert section["g_teacher"]["model"] == "foundation"
    assert section["g_teacher"]["sha256"] == sha256_file(str(tiny_foundation))
    assert section["g_teacher"]["fingerprint"] == state_fingerprint(m0)
    assert section["previous_model"]["sha256"] == sha256_file(str(previous_model))
    assert section["rft"]["student_init"] == "fft" and section["rft"]["budget"] == "fft_full"
    # g_layers=encoder: a generalization term was computed (on M0's encoder stages only: test_lora_distill); an
    # epoch whose batches drew no buffer case logs 0
    assert section["rft"]["g_layers"] == "encoder" and any(g > 0 for g in final["logging"]["medseqft_g"])
    # k_layers=encoder: F_t's encoder alone is the knowledge teacher; the student's taps there left F_t's
    assert section["rft"]["k_layers"] == "encoder" and all(k > 0 for k in final["logging"]["medseqft_k"])
    assert tuple(final["inference_allowed_mirroring_axes"]) == (0, 1, 2), "nnU-Net's mirroring by default"


def test_export_fft_with_an_adamw_stage_b_and_no_mirroring(planned_task, tiny_foundation):
    """With the readings that are not the defaults: student M_(t-1) + LoRA, M_(t-1) as the buffer teacher, split."""
    plans = _plans(planned_task, "MedSeqFTPlansReadB", export="fft", stage_b_optimizer="adamw", stage_b_lr=0.002,
                   student_init="previous", g_teacher="previous", g_layers="all", budget="split",
                   training={"mirroring": 0})
    _, out = _train(planned_task, plans, tiny_foundation)
    final, fft = _load(out / "checkpoint_final.pth"), _load(out / "checkpoint_fft.pth")
    # budget mirroring=0: no mirroring augmentation, and stock nnUNetv2_predict reads no test-time mirror axes
    assert final["inference_allowed_mirroring_axes"] is None and fft["inference_allowed_mirroring_axes"] is None
    assert set(final["network_weights"]) == set(fft["network_weights"])
    assert all(torch.equal(v, fft["network_weights"][k]) for k, v in final["network_weights"].items()), \
        "export=fft: checkpoint_final.pth holds F_t"
    assert (out / "adapter" / "adapter_model.safetensors").is_file(), "M_t stays rebuildable"
    lrs = final["logging"]["lrs"]
    assert lrs[2] == pytest.approx(0.002) and lrs[1] < 0.01, lrs  # stage B's own poly from stage_b_lr
    assert "betas" in final["optimizer_state"]["param_groups"][0], "AdamW trained stage B"
    assert final["medseqft"]["g_teacher"]["model"] == "previous" and len(final["logging"]["train_losses"]) == 4
    assert final["medseqft"]["student_start"] != state_fingerprint(fft["network_weights"])


def test_foundation_teacher_refused_when_the_foundation_moved(planned_task, tmp_path):
    plans = _plans(planned_task, "MedSeqFTPlansReadC", foundation_path=str(tmp_path / "gone.pth"),
                   g_teacher="foundation")
    proc, out = _train(planned_task, plans, tmp_path / "gone.pth", check=False)
    assert proc.returncode != 0
    assert "g_teacher=foundation" in proc.stderr and "moved or deleted" in proc.stderr
    assert not (out / "checkpoint_latest.pth").exists() and not (out / "checkpoint_fft.pth").exists()


def test_readings_refuse_unknown_values_naming_the_allowed_ones():
    with pytest.raises(MedSeqFTError, match="student_init='foo' does not exist; choose one of: fft, previous"):
        RFTSettings.from_dict({"student_init": "foo"})
    with pytest.raises(MedSeqFTError, match="stage_b_lr must be > 0"):
        RFTSettings.from_dict({"stage_b_lr": 0})
    assert RFTSettings.from_dict(RFTSettings(export="fft").to_dict()) == RFTSettings(export="fft")


def test_lora_only_baseline_pins_the_readings_it_can_train(planned_task, tiny_foundation):
    """The defaults need F_t and a teacher; the LoRA-only baseline has neither and trains M_(t-1) + LoRA, split."""
    out = planned_task.folders.results / planned_task.dataset_name / \
        "MedSeqFTLoRATrainer_tiny__MedSeqFTPlans__3d_fullres" / "fold_0"
    run(["nnUNetv2_train", str(FIRST_TASK_ID), "3d_fullres", "0", "-tr", "MedSeqFTLoRATrainer_tiny", "-p",
         "MedSeqFTPlans", "-device", "cpu", "-pretrained_weights", str(tiny_foundation)], planned_task.folders)
    final = _load(out / "checkpoint_final.pth")
    rft = final["medseqft"]["rft"]
    assert (rft["student_init"], rft["budget"], rft["g_teacher"]) == ("previous", "split", "previous")
    assert len(final["logging"]["train_losses"]) == 4 and not (out / "checkpoint_fft.pth").exists()
    assert final["medseqft"]["student_start"] == state_fingerprint(_load(out / "previous_model.pth")["network_weights"])
    assert all(k == 0 for k in final["logging"]["medseqft_k"]), "no retention terms"


def test_a_run_records_its_readings_so_a_default_change_never_mixes_them():
    """Manifests store readings as differences from the earlier defaults: a run made before the defaults changed
    matches (and resumes) under its own readings; a new run records today's defaults explicitly."""
    new = RFTSettings.run_record({}, from_command=True)
    assert new == {k: getattr(RFTSettings(), k) for k in RFTSettings.RECORDED_AGAINST
                   if getattr(RFTSettings(), k) != RFTSettings.RECORDED_AGAINST[k]}
    assert new["student_init"] == "fft" and new["budget"] == "fft_full"
    assert RFTSettings.run_record(new, from_command=False) == new  # a manifest's record reads back unchanged
    old = RFTSettings.run_record({}, from_command=False)  # a manifest from before: no readings recorded
    assert old == {} and RFTSettings.for_trainer(old)["student_init"] == "previous"
    # the command that resumes an old run names its readings; other settings pass through
    assert RFTSettings.run_record({**RFTSettings.RECORDED_AGAINST, "lambda_g": 0.5}, from_command=True) == \
        {"lambda_g": 0.5}
    assert RFTSettings.from_dict(RFTSettings.for_trainer(new)) == RFTSettings()
    # the refusal after a default change names the flags that record the stored readings again
    for stored in ({}, {"lambda_g": 0.5}, {"student_init": "fft", "lora_rank": 4}):
        flags = rft_resume_flags("medseqft", stored)
        assert RFTSettings.run_record(dict(key_value(f) for f in flags), from_command=True) == stored
    assert set(rft_resume_flags("medseqft", {})) == {"student_init=previous", "g_teacher=previous", "g_layers=all",
                                                     "budget=split", "k_layers=all",
                                                     "retention_every=1"}
