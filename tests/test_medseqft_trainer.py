"""MedSeqFTTrainer: real tiny nnUNetv2_train runs (stage A, stage B, merge), stock predict, resume, bad inputs."""

import hashlib
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import FIRST_TASK_ID
from nnunet_helpers import BIN, run, run_python
from peft import PeftModel
from safetensors.torch import load_file

from nnunetv2_medseqft import adapters as lora
from nnunetv2_medseqft.checkpoints import sha256_file, state_fingerprint

TRAINER = "MedSeqFTTrainer_tiny"


def _train_cmd(tiny_foundation, fold, *extra):
    return ["nnUNetv2_train", str(FIRST_TASK_ID), "3d_fullres", str(fold), "-tr", TRAINER, "-p", "MedSeqFTPlans",
            "-device", "cpu", *extra] + (["-pretrained_weights", str(tiny_foundation)] if "--c" not in extra else [])


def _out(planned_task, fold):
    return planned_task.folders.results / planned_task.dataset_name / f"{TRAINER}__MedSeqFTPlans__3d_fullres" / f"fold_{fold}"


@pytest.fixture(scope="module")
def trained(planned_task, tiny_foundation):
    run(_train_cmd(tiny_foundation, 0), planned_task.folders)
    return _out(planned_task, 0)


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_run_writes_ft_mt_adapter_and_provenance(trained, tiny_foundation, planned_task):
    for name in ("checkpoint_fft.pth", "checkpoint_final.pth", "previous_model.pth", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "adapter/norms_and_head.safetensors"):
        assert (trained / name).is_file(), name
    final, fft = _load(trained / "checkpoint_final.pth"), _load(trained / "checkpoint_fft.pth")
    assert set(final["network_weights"]) == set(fft["network_weights"]), "M_t is a plain nnU-Net network"
    assert all(final["network_weights"][k].shape == v.shape for k, v in fft["network_weights"].items())
    assert not any("lora" in k for k in final["network_weights"])
    section = final["medseqft"]
    assert section["stage"] == "merged" and fft["medseqft"]["stage"] == "A"
    assert section["previous_model"]["sha256"] == sha256_file(str(tiny_foundation))
    assert section["foundation"]["sha256"] == sha256_file(str(tiny_foundation))
    assert section["rft"]["lora_rank"] == 4 and section["buffer"]["mode"] == "mds"
    assert len(section["buffer"]["buffer"]) >= 2
    body = [k for k in fft["network_weights"] if ".seg_layers." not in k]
    assert any(not torch.equal(final["network_weights"][k], fft["network_weights"][k]) for k in body)
    log = final["logging"]
    # the default readings: F_t + LoRA, M0 as the buffer teacher, stage B (2 epochs) on top of stage A's 4
    assert section["student_start"] == state_fingerprint(fft["network_weights"])
    assert section["g_teacher"]["model"] == "foundation" and len(log["train_losses"]) == 6
    assert len(log["medseqft_k"]) == 2 and all(v > 0 for v in log["medseqft_k"]), "K term logged per stage-B epoch"
    assert len(log["medseqft_seg"]) == 2


def test_mt_rebuilds_from_its_base_and_adapter(trained):
    """The student's base (the default student_init=fft: F_t) + peft adapter + trained norms/head ==
    checkpoint_final (with student_init=previous the base is previous_model.pth: what chain packing relies on)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    final = _load(trained / "checkpoint_final.pth")
    pm = PlansManager(final["init_args"]["plans"])
    base = nnUNetTrainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 1, 2, True)
    assert final["medseqft"]["rft"]["student_init"] == "fft"
    base.load_state_dict(_load(trained / "checkpoint_fft.pth")["network_weights"])
    student = PeftModel.from_pretrained(base, str(trained / "adapter"))
    lora.relink_conv_blocks(student)
    student.base_model.model.load_state_dict(load_file(str(trained / "adapter/norms_and_head.safetensors")),
                                             strict=False)
    rebuilt = lora.merge(student).state_dict()
    diff = max((rebuilt[k] - v).abs().max().item() for k, v in final["network_weights"].items())
    assert diff < 1e-5, diff


def test_chain_pack_stores_a_model_on_its_own_ft_in_full(trained, tmp_path):
    """student_init=fft: the adapter's base is F_t, not an earlier model of the chain, so no adapter storage."""
    from nnunetv2_medseqft.reports import chain_pack

    rebuilt, why = chain_pack._pack_adapter(str(tmp_path), "t", {}, str(trained), _load(trained / "checkpoint_final.pth"),
                                            {}, {})
    assert rebuilt is None and "student_init=fft" in why


def test_stock_predict_on_merged_model(trained, planned_task, tmp_path):
    raw = planned_task.folders.raw / planned_task.dataset_name
    case = sorted((raw / "imagesTr").glob("*_0000.nii.gz"))[0]
    (tmp_path / "in").mkdir()
    os.symlink(case, tmp_path / "in" / case.name)
    run(["nnUNetv2_predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-d", str(FIRST_TASK_ID),
         "-c", "3d_fullres", "-f", "0", "-tr", TRAINER, "-p", "MedSeqFTPlans", "-device", "cpu",
         "-npp", "1", "-nps", "1", "--disable_tta"], planned_task.folders)
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / case.name.replace("_0000", ""))))
    assert seg.shape == sitk.GetArrayFromImage(sitk.ReadImage(str(case))).shape
    assert set(np.unique(seg)) <= {0, 1}


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_kill_inside_stage_b_and_resume(planned_task, tiny_foundation):
    out = _out(planned_task, 1)
    # own process group: SIGKILL hits the trainer and its data-augmentation workers, like a killed job
    proc = subprocess.Popen([str(BIN / c) if i == 0 else c for i, c in enumerate(_train_cmd(tiny_foundation, 1))],
                            env=planned_task.folders.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 900
    try:
        while time.time() < deadline:
            latest = out / "checkpoint_latest.pth"
            if latest.is_file() and proc.poll() is None:
                try:
                    if _load(latest)["medseqft"]["stage"] == "B":
                        break
                except Exception:  # being written right now
                    pass
            assert proc.poll() is None, "training ended before it could be interrupted in stage B"
            time.sleep(1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not (out / "checkpoint_final.pth").exists()
    fft_hash = _sha(out / "checkpoint_fft.pth")
    run(_train_cmd(tiny_foundation, 1, "--c"), planned_task.folders)
    final = _load(out / "checkpoint_final.pth")
    assert final["medseqft"]["stage"] == "merged" and final["current_epoch"] == 6
    assert _sha(out / "checkpoint_fft.pth") == fft_hash, "F_t must never be rewritten by a resumed run"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_missing_pretrained_weights_is_explained(planned_task):
    proc = run(["nnUNetv2_train", str(FIRST_TASK_ID), "3d_fullres", "2", "-tr", TRAINER, "-p", "MedSeqFTPlans",
                "-device", "cpu"], planned_task.folders, check=False)
    assert proc.returncode != 0
    assert "-pretrained_weights" in proc.stderr and "foundation itself" in proc.stderr


def test_other_architecture_is_refused_naming_medseqft_plan(planned_task, tiny_foundation, tmp_path):
    ckpt = _load(tiny_foundation)
    arch = ckpt["init_args"]["plans"]["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [f * 2 for f in arch["features_per_stage"]]
    torch.save(ckpt, tmp_path / "other.pth")
    proc = run(["nnUNetv2_train", str(FIRST_TASK_ID), "3d_fullres", "3", "-tr", TRAINER, "-p", "MedSeqFTPlans",
                "-device", "cpu", "-pretrained_weights", str(tmp_path / "other.pth")], planned_task.folders,
               check=False)
    assert proc.returncode != 0 and "medseqft plan" in proc.stderr and "architecture" in proc.stderr


def test_corrupt_pretrained_weights(planned_task, tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    proc = run(["nnUNetv2_train", str(FIRST_TASK_ID), "3d_fullres", "3", "-tr", TRAINER, "-p", "MedSeqFTPlans",
                "-device", "cpu", "-pretrained_weights", str(tmp_path / "bad.pth")], planned_task.folders, check=False)
    assert proc.returncode != 0 and "unreadable or truncated" in proc.stderr


def test_torch_threads_from_the_environment(planned_task, tiny_foundation):
    code = ("import os, torch; os.environ['MEDSEQFT_TORCH_THREADS'] = '1'; torch.set_num_threads(2)\n"
            "from nnunetv2.run.run_training import get_trainer_from_args\n"
            f"get_trainer_from_args('{FIRST_TASK_ID}', '3d_fullres', 0, '{TRAINER}', 'MedSeqFTPlans', "
            "device=torch.device('cpu'))\nprint('threads', torch.get_num_threads())")
    assert "threads 1" in run_python(code, planned_task.folders).stdout
    env_bad = {"MEDSEQFT_TORCH_THREADS": "two"}
    proc = subprocess.run([str(BIN / "nnUNetv2_train"), *_train_cmd(tiny_foundation, 3)[1:]], capture_output=True,
                          text=True, env={**planned_task.folders.env(), **env_bad})
    assert proc.returncode != 0 and "MEDSEQFT_TORCH_THREADS must be a whole number" in proc.stderr
    assert not _out(planned_task, 3).exists() or not any(_out(planned_task, 3).glob("checkpoint_*.pth"))


def test_stage_b_only_trainer_with_given_ft(trained, planned_task, tiny_foundation):
    """MedSeqFTRFTTrainer: F_t from the plans' medseqft.fft_model, every epoch in stage B; without it a clear error."""
    import json

    plans = json.loads((planned_task.preprocessed / "MedSeqFTPlans.json").read_text())
    proc = run(["nnUNetv2_train", str(FIRST_TASK_ID), "3d_fullres", "0", "-tr", "MedSeqFTRFTTrainer_tiny", "-p",
                "MedSeqFTPlans", "-device", "cpu", "-pretrained_weights", str(tiny_foundation)],
               planned_task.folders, check=False)
    assert proc.returncode != 0 and "needs F_t" in proc.stderr and "fft_model" in proc.stderr
    plans["plans_name"] = "MedSeqFTPlansRFT"  # same data identifier: the same preprocessed data
    plans["medseqft"]["fft_model"] = str(trained / "checkpoint_fft.pth")
    (planned_task.preprocessed / "MedSeqFTPlansRFT.json").write_text(json.dumps(plans))
    run(["nnUNetv2_train", str(FIRST_TASK_ID), "3d_fullres", "0", "-tr", "MedSeqFTRFTTrainer_tiny", "-p",
         "MedSeqFTPlansRFT", "-device", "cpu", "-pretrained_weights", str(tiny_foundation)], planned_task.folders)
    out = planned_task.folders.results / planned_task.dataset_name / \
        "MedSeqFTRFTTrainer_tiny__MedSeqFTPlansRFT__3d_fullres" / "fold_0"
    final = _load(out / "checkpoint_final.pth")
    assert final["medseqft"]["stage"] == "merged" and not (out / "checkpoint_fft.pth").exists()
    assert final["medseqft"]["fft_model"]["sha256"] == sha256_file(str(trained / "checkpoint_fft.pth"))
    assert len(final["logging"]["medseqft_k"]) == 4 and all(v > 0 for v in final["logging"]["medseqft_k"])


def test_a_given_stage_a_is_taken_not_trained(trained, planned_task, tiny_foundation):
    """MedSeqFTTrainer with the plans' medseqft.fft_model (what medseqft run gives the first task: the shared full
    fine-tuning of M0) trains stage B only: F_t is the given model, its log is stage A's; another budget is refused."""
    import json

    plans = json.loads((planned_task.preprocessed / "MedSeqFTPlans.json").read_text())
    given = trained / "checkpoint_final.pth"  # trained 6 epochs: not a 4-epoch stage A
    plans["plans_name"], plans["medseqft"]["fft_model"] = "MedSeqFTPlansGivenA", str(given)
    (planned_task.preprocessed / "MedSeqFTPlansGivenA.json").write_text(json.dumps(plans))
    cmd = ["nnUNetv2_train", str(FIRST_TASK_ID), "3d_fullres", "0", "-tr", TRAINER, "-p", "MedSeqFTPlansGivenA",
           "-device", "cpu", "-pretrained_weights", str(tiny_foundation)]
    out = planned_task.folders.results / planned_task.dataset_name / f"{TRAINER}__MedSeqFTPlansGivenA__3d_fullres" / \
        "fold_0"
    proc = run(cmd, planned_task.folders, check=False)
    assert proc.returncode != 0 and "was trained for 6 epochs" in proc.stderr and "stage A has 4" in proc.stderr
    assert not out.exists() or not any(out.glob("*.pth"))

    given = trained / "checkpoint_fft.pth"  # stage A of the same trainer and budget
    plans["medseqft"]["fft_model"] = str(given)
    (planned_task.preprocessed / "MedSeqFTPlansGivenA.json").write_text(json.dumps(plans))
    run(cmd, planned_task.folders)
    final, fft, source = _load(out / "checkpoint_final.pth"), _load(out / "checkpoint_fft.pth"), _load(given)
    assert all(torch.equal(fft["network_weights"][k], v) for k, v in source["network_weights"].items())
    assert final["medseqft"]["fft_model"]["sha256"] == sha256_file(str(given))
    log = final["logging"]
    assert len(log["train_losses"]) == 6 and log["train_losses"][:4] == source["logging"]["train_losses"]
    assert len(log["medseqft_k"]) == 2 and final["medseqft"]["stage"] == "merged"
    text = "".join(p.read_text() for p in out.glob("training_log_*.txt"))
    assert "Stage A given" in text and "Epoch 0 " not in text and "Epoch 4 (MedSeqFT stage B)" in text
