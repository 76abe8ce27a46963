"""bf16 mixed precision on a CPU: when it is on, what runs in bf16 and what stays float32, and a real training in it."""

import json

import pytest
import torch
from conftest import FIRST_TASK_ID
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunet_helpers import run
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunetv2_medseqft.cpu_precision import ENV, FloatLogits, cpu_autocast, cpu_bf16, cpu_has_bf16
from nnunetv2_medseqft.errors import MedSeqFTError


def test_the_variable_decides_and_a_bad_value_is_named(monkeypatch):
    cpu = torch.device("cpu")
    for value, expected in (("0", False), ("1", True), ("auto", cpu_has_bf16()), (" AUTO ", cpu_has_bf16())):
        monkeypatch.setenv(ENV, value)
        assert cpu_bf16(cpu) is expected, value
    monkeypatch.delenv(ENV)
    assert cpu_bf16(cpu) is cpu_has_bf16()
    monkeypatch.setenv(ENV, "1")
    assert cpu_bf16(torch.device("cuda")) is False  # CUDA: nnU-Net's own fp16 autocast
    monkeypatch.setenv(ENV, "yes")
    with pytest.raises(MedSeqFTError, match=r"MEDSEQFT_CPU_BF16='yes'.*auto.*0.*1"):
        cpu_bf16(cpu)


def test_convolutions_in_bf16_the_loss_in_float32_and_a_network_learns():
    torch.manual_seed(0)
    net = PlainConvUNet(1, 3, (4, 8, 16), torch.nn.Conv3d, 3, (1, 2, 2), 2, 3, 2, True, torch.nn.InstanceNorm3d,
                        {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU, {"inplace": True},
                        deep_supervision=True)
    dice_ce = DeepSupervisionWrapper(DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                                                    dice_class=MemoryEfficientSoftDiceLoss), [0.57, 0.29, 0.14])
    seen = []

    def recorded(output, target):
        seen.append({o.dtype for o in output})
        return dice_ce(output, target)

    loss = FloatLogits(recorded)
    x = torch.randn(2, 1, 16, 16, 16)
    y = (x > 0.5).float()  # a target the network can learn from its input
    target = [y, y[:, :, ::2, ::2, ::2], y[:, :, ::4, ::4, ::4]]
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    values = []
    for _ in range(30):
        opt.zero_grad()
        with cpu_autocast(True):
            out = net(x)
            value = loss(out, target)
        value.backward()
        opt.step()
        values.append(value.item())
    assert all(o.dtype == torch.bfloat16 for o in out), "convolutions ran in bf16"
    assert seen[0] == {torch.float32} and value.dtype == torch.float32, "the loss saw float32 logits"
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in net.parameters())
    assert values[-1] < 0.6 * values[0], values
    with cpu_autocast(False):
        assert all(o.dtype == torch.float32 for o in net(x))


def test_ssl_loss_steps_in_bf16_with_a_float32_error():
    from nnunetv2_medseqft.method.ssl import SSLSettings, ssl_losses

    torch.manual_seed(0)
    net = PlainConvUNet(1, 3, (4, 8, 16), torch.nn.Conv3d, 3, (1, 2, 2), 2, 1, 2, True, torch.nn.InstanceNorm3d,
                        {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU, {"inplace": True})
    outputs = []
    net.register_forward_hook(lambda module, args, out: outputs.append(out.dtype))
    x = torch.randn(2, 1, 16, 16, 16)
    settings = SSLSettings(block_size=4)
    for enabled, conv_dtype in ((True, torch.bfloat16), (False, torch.float32)):
        loss, baseline = ssl_losses(net, x, settings, torch.Generator().manual_seed(1), cpu_bf16=enabled)
        assert outputs[-1] == conv_dtype
        assert loss.dtype == baseline.dtype == torch.float32 and bool(torch.isfinite(loss).all())
    loss.mean().backward()
    assert all(p.grad.dtype == torch.float32 for p in net.parameters() if p.grad is not None)


def test_a_training_in_bf16_says_so_and_keeps_float32_weights(planned_task, tiny_foundation, monkeypatch):
    plans = json.loads((planned_task.preprocessed / "MedSeqFTPlans.json").read_text())
    plans["plans_name"] = "MedSeqFTPlansBF16"  # its own output folder; the same preprocessed data
    (planned_task.preprocessed / "MedSeqFTPlansBF16.json").write_text(json.dumps(plans))
    monkeypatch.setenv(ENV, "1")  # on whatever CPU runs the tests (emulated where it lacks bf16 instructions)
    folders = planned_task.folders
    run(["nnUNetv2_train", str(FIRST_TASK_ID), "3d_fullres", "0", "-tr", "MedSeqFTTrainer_tiny", "-p",
         "MedSeqFTPlansBF16", "-device", "cpu", "-pretrained_weights", str(tiny_foundation)], folders)
    out = folders.results / planned_task.dataset_name / "MedSeqFTTrainer_tiny__MedSeqFTPlansBF16__3d_fullres" / "fold_0"
    log = "".join(p.read_text() for p in out.glob("training_log_*.txt"))
    assert "bf16 mixed precision on this CPU" in log and "(MedSeqFT stage B)" in log
    final = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["medseqft"]["cpu_bf16"] is True
    weights = final["network_weights"]
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())
    assert all(bool(torch.isfinite(v).all()) for v in weights.values() if v.is_floating_point())
    assert all(loss == loss for loss in final["logging"]["train_losses"])  # no NaN epoch


def test_a_bad_setting_stops_run_and_demo_before_any_work(monkeypatch, tmp_path, capsys):
    from nnunetv2_medseqft.cli.main import main

    monkeypatch.setenv(ENV, "fast")
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 2 and not out.exists()
    assert main(["run", "--foundation", str(tmp_path / "m0.pth"), "--datasets", "501", "--method", "medseqft",
                 "--name", "bad-setting"]) == 2
    assert capsys.readouterr().err.count("MEDSEQFT_CPU_BF16='fast'") == 2  # named, before the missing foundation
