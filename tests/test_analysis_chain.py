"""Chain packs (exact round trip, refusals, size) and analyses (loss landscape, parameter variation).

Unit tests use a tiny network built from a plans architecture section (no training); the rest packs,
unpacks and analyses the session's real tiny 2-task MedSeqFT run (fixture ``medseqft_run``)."""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil

import numpy as np
import pytest
import torch

from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.reports import analysis, landscape
from nnunetv2_medseqft.reports import chain_pack as chain
from nnunet_helpers import manifest

NAME = "t-medseqft"  # the session fixture medseqft_run (conftest.py)
TASK_NAMES = ["Dataset501_MSFTLiver", "Dataset502_MSFTSpleen"]
ARCH = {  # a plans' architecture section, three stages of 4..16 features
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {"n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
                    "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                    "n_conv_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
                    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                    "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                    "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


# ---------------------------------------------------------------- tiny network, no training

def tiny_net(features=(4, 8, 16), seed=0) -> torch.nn.Module:
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    torch.manual_seed(seed)
    arch = copy.deepcopy(ARCH)
    arch["arch_kwargs"]["features_per_stage"] = list(features)
    net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1, 3,
                                 allow_init=True, deep_supervision=False)
    with torch.no_grad():  # norm affines away from their (1, 0) start, so that a wrong perturbation would show
        for p in net.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return net.eval()


@pytest.fixture()
def evaluator():
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    g = torch.Generator().manual_seed(0)
    data = torch.randn((2, 1, 16, 16, 16), generator=g)
    target = torch.randint(0, 3, (2, 1, 16, 16, 16), generator=g).float()
    lm = LabelManager({"background": 0, "a": 1, "b": 2}, None)
    return analysis.Evaluator(data, target, analysis.segmentation_loss(lm, batch_dice=False), lm.foreground_labels)


def test_landscape_centre_is_the_models_own_loss_and_weights_are_restored(evaluator):
    net = tiny_net()
    with torch.no_grad():
        own = float(evaluator.loss_fn(net(evaluator.data), evaluator.target))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    one = analysis.landscape({"m": net}, evaluator, grid=3, seed=0)["models"]["m"]
    assert one["centre"]["loss"] == own
    assert one["loss"][1] == own  # alpha = 0 on the grid is the model itself, bit for bit
    assert one["loss"][0] != own and one["loss"][2] != own
    assert one["sharpness"]["loss_rise"] == pytest.approx(one["sharpness"]["loss_at_radius"] - own)
    two = analysis.landscape({"m": net}, evaluator, grid=3, two_d=True, seed=0)["models"]["m"]
    assert two["loss"][1][1] == own and two["loss"][1][0] == one["loss"][0]  # (alpha, 0): the 1D direction
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_directions_are_filter_normalised_and_skip_biases_and_norms():
    net = tiny_net()
    params = dict(net.named_parameters())
    raw = analysis.random_directions(net, seed=0, count=1)[0]
    d = analysis.filter_normalised(net, raw)
    assert set(d) == {n for n, p in params.items() if p.dim() > 1}  # biases, norm affines: zero direction
    assert any("transpconvs" in n for n in d) and any("seg_layers" in n for n in d)
    for name, dn in d.items():
        axis = 1 if "transpconvs" in name else 0  # a ConvTranspose3d weight is [in, out, k, k, k]
        w = params[name].detach()
        filters = [t.movedim(axis, 0).flatten(1).norm(dim=1) for t in (dn, w)]
        torch.testing.assert_close(filters[0], filters[1], rtol=1e-5, atol=1e-7)
    # the same draws for a second model (same seed and shapes), scaled by that model's own filters
    other = tiny_net(seed=1)
    raw2 = analysis.random_directions(other, seed=0, count=1)[0]
    assert all(torch.equal(raw[n], raw2[n]) for n in raw)
    name = next(iter(d))
    assert not torch.allclose(analysis.filter_normalised(other, raw2)[name], d[name])
    perturbed = landscape._Perturbed(net, [d])
    perturbed.set(0.7)
    assert all(torch.equal(p, params[n]) for n, p in net.named_parameters() if n not in d)
    assert not torch.equal(dict(net.named_parameters())[name], perturbed.origin[name])
    perturbed.restore()


def test_models_of_different_architectures_are_refused(evaluator):
    with pytest.raises(MedSeqFTError, match=r"different architectures \(encoder.stages.2.0.convs.0.conv.weight "
                                            r"is \(16, 8, 3, 3, 3\) in small, \(32, "):
        analysis.landscape({"small": tiny_net((4, 8, 16)), "wide": tiny_net((4, 8, 32))}, evaluator, grid=3)


def test_effective_rank_and_layer_groups():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(32, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 100, generator=g, dtype=torch.float64)
    assert 1.0 < analysis.effective_rank(low) <= 3.0 + 1e-9
    assert analysis.effective_rank(torch.eye(5)) == pytest.approx(5.0)
    assert analysis.effective_rank(torch.zeros(4, 6)) == 0.0
    noisy = low + 1e-9 * torch.randn(32, 100, generator=g, dtype=torch.float64)
    assert analysis.effective_rank(noisy) > analysis.effective_rank(low)  # rounding-level noise lifts it ...
    assert analysis.effective_rank(noisy, floor=1e-6) == pytest.approx(analysis.effective_rank(low))  # ... unless cut
    assert analysis.layer_group("encoder.stages.2.0.convs.1.conv.weight") == "enc2"
    assert analysis.layer_group("decoder.transpconvs.0.weight") == "up0"
    assert analysis.layer_group("decoder.stages.1.convs.0.norm.bias") == "dec1"
    for alias in ("decoder.encoder.stages.0.0.convs.0.conv.weight", "decoder.seg_layers.1.weight",
                  "encoder.stages.0.0.convs.0.all_modules.0.weight"):
        assert analysis.layer_group(alias) is None


def test_checkpoint_meta_survives_json():
    meta = {"logging": {"loss": [np.float32(0.5), np.float32(np.nan)], "lrs": [0.01, 0.009]},
            "_best_ema": np.float32(0.25), "init_args": {"device": torch.device("cpu"), "fold": 0},
            "inference_allowed_mirroring_axes": (0, 1, 2), "grad_scaler_state": None, "odd": {1: "a"},
            "small": torch.arange(3)}
    back = chain.decode(json.loads(json.dumps(chain.encode(meta))))
    assert chain.same(back, meta)
    assert type(back["_best_ema"]) is np.float32 and back["inference_allowed_mirroring_axes"] == (0, 1, 2)
    with pytest.raises(MedSeqFTError, match="Cannot store checkpoint.big"):
        chain.encode({"big": torch.zeros(5000)})


# ---------------------------------------------------------------- a real tiny 2-task run

@pytest.fixture(scope="module")
def env(nnunet):
    """nnU-Net's variables in this process too (pack, unpack and analyze run in-process)."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in nnunet.env().items():
            if key.startswith("nnUNet"):
                mp.setenv(key, value)
        yield nnunet


@pytest.fixture(scope="module")
def chain_run(env, medseqft_run) -> dict:
    """The session's 2-task MedSeqFT run (killed after task 1 and resumed: the chain must not care)."""
    return manifest(env, NAME)


@pytest.fixture(scope="module")
def packed(chain_run, tmp_path_factory) -> dict:
    return chain.pack_run(NAME, str(tmp_path_factory.mktemp("pack") / "pack"))


def _cli(module, name, argv):
    parser = argparse.ArgumentParser()
    module.configure_parser(parser.add_subparsers().add_parser(name), name)
    args = parser.parse_args([name, *argv])
    return args.func(args)


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _assert_same_checkpoint(rebuilt_path, original_path):
    a, b = _load(rebuilt_path), _load(original_path)
    assert list(a) == list(b), "same top-level keys, same order"
    assert list(a["network_weights"]) == list(b["network_weights"])
    diff = max((a["network_weights"][k] - v).abs().max().item() for k, v in b["network_weights"].items())
    assert diff <= 1e-6, diff
    assert a["optimizer_state"] is None
    assert all(chain.same(a[k], b[k]) for k in a if k not in ("network_weights", "optimizer_state"))
    return a, b


def test_pack_unpack_round_trip_is_exact(chain_run, packed, tiny_foundation, tmp_path, capsys):
    assert packed["tasks"] == TASK_NAMES and [e["storage"] for e in packed["entries"]] == ["lora", "lora"]
    assert [e["base"] for e in packed["entries"]] == ["foundation", "task:0"]
    ratio = packed["pack_bytes"] / packed["checkpoint_bytes"]
    with capsys.disabled():
        print(f"\nchain pack of {NAME}: {packed['pack_bytes']:,} B vs checkpoint_final.pth files "
              f"{packed['checkpoint_bytes']:,} B, ratio {ratio:.4f}")
    assert ratio < 0.3
    assert _cli(chain, "chain", ["unpack", packed["path"], "--foundation", str(tiny_foundation),
                                 "--out", str(tmp_path / "out")]) == 0
    for dataset in TASK_NAMES:
        original = chain_run["steps"][f"train/{dataset}"]["outputs"]["model"]["path"]
        rebuilt, _ = _assert_same_checkpoint(tmp_path / "out" / dataset / "checkpoint_final.pth", original)
        # nnU-Net builds and loads it (strict) and predicts a validation patch exactly as the original
        data, _, _ = analysis.validation_patches(rebuilt["init_args"], 1)
        with torch.no_grad():
            logits = [analysis.network_from_checkpoint(_load(p))(data) for p in
                      (tmp_path / "out" / dataset / "checkpoint_final.pth", original)]
        assert torch.equal(logits[0], logits[1])


def test_pack_missing_a_task_is_refused(packed, tiny_foundation, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(packed["path"], broken)
    shutil.rmtree(broken / "tasks" / f"01_{TASK_NAMES[1]}")
    with pytest.raises(MedSeqFTError, match=f"incomplete(.|\n)*task 2 {TASK_NAMES[1]}: .*missing(.|\n)*re-pack"):
        chain.unpack(str(broken), str(tiny_foundation), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists(), "nothing is written from an incomplete pack"


def test_other_foundation_is_refused_naming_both_hashes(packed, tiny_foundation, tmp_path):
    from nnunetv2_medseqft.checkpoints import sha256_file

    other = tmp_path / "other.pth"
    other.write_bytes(tiny_foundation.read_bytes() + b"\0")
    with pytest.raises(MedSeqFTError) as e:
        chain.unpack(packed["path"], str(other), str(tmp_path / "out"))
    text = str(e.value)
    assert sha256_file(str(other)) in text and packed["foundation_sha256"] in text and "--foundation" in text


def test_task_without_adapter_is_stored_full_and_fft_is_packed(chain_run, tiny_foundation, tmp_path):
    """What seqfft/parallel runs look like (no adapter): full weights; later LoRA tasks still chain on them."""
    folder = os.path.dirname(chain_run["steps"][f"train/{TASK_NAMES[0]}"]["outputs"]["model"]["path"])
    os.rename(os.path.join(folder, "adapter"), os.path.join(folder, "adapter.hidden"))
    try:
        assert _cli(chain, "chain", ["pack", NAME, "--out", str(tmp_path / "pack"), "--with-fft"]) == 0
    finally:
        os.rename(os.path.join(folder, "adapter.hidden"), os.path.join(folder, "adapter"))
    index = chain.read_index(str(tmp_path / "pack"))
    assert [e["storage"] for e in index["entries"]] == ["full", "lora"]
    assert index["entries"][1]["base"] == "task:0"
    chain.unpack(str(tmp_path / "pack"), str(tiny_foundation), str(tmp_path / "out"))
    for dataset in TASK_NAMES:
        original = chain_run["steps"][f"train/{dataset}"]["outputs"]["model"]["path"]
        _assert_same_checkpoint(tmp_path / "out" / dataset / "checkpoint_final.pth", original)
        _assert_same_checkpoint(tmp_path / "out" / dataset / "checkpoint_fft.pth",
                                os.path.join(os.path.dirname(original), "checkpoint_fft.pth"))


def test_params_analysis_of_the_run(chain_run, env):
    assert _cli(analysis, "analyze", ["params", NAME]) == 0
    out = env.results / "medseqft_runs" / NAME / "analysis"
    assert (out / "params.png").read_bytes()[:4] == b"\x89PNG"
    result = json.loads((out / "params.json").read_text())["runs"][0]
    assert result["groups"] == ["enc0", "enc1", "enc2", "enc3", "dec0", "dec1", "dec2", "up0", "up1", "up2"]
    assert result["lora_rank"] == 4 and [r["task"] for r in result["rows"]] == TASK_NAMES
    for row in result["rows"]:
        assert all(v >= 0 for v in row["relative_change"].values())
        for layer in row["effective_ranks"]:
            if layer["group"].startswith("up"):  # transposed convs carry no LoRA and are frozen in stage B
                assert layer["effective_rank"] == 0.0 and layer["update_norm"] == 0.0
            else:  # a merged LoRA update has rank <= r
                assert 0.0 < layer["effective_rank"] <= 4.0 + 1e-6, layer
    # the second task's change against M0 carries the first's (M_2 = M_1 + a LoRA update): every group the first task
    # moved is still moved, by another amount. Not more in sum: the update may partly cancel the first's (seen in
    # clean-clone CI runs: 0.0173 vs 0.0177 in float32, 0.0234 vs 0.0303 in bf16)
    first, second = (r["relative_change"] for r in result["rows"])
    assert sum(first.values()) > 0 and second != first
    assert all(second[g] > 0 for g, change in first.items() if change)


def test_landscape_of_the_run(chain_run, env):
    assert _cli(analysis, "analyze", ["landscape", "--run", NAME, "--task", "502", "--models", "M", "F", "--grid",
                                      "3", "--cases", "1"]) == 0
    out = env.results / "medseqft_runs" / NAME / "analysis"
    assert (out / f"landscape_{TASK_NAMES[1]}_1d.png").read_bytes()[:4] == b"\x89PNG"
    result = json.loads((out / f"landscape_{TASK_NAMES[1]}_1d.json").read_text())
    assert result["alphas"] == [-1.0, 0.0, 1.0] and len(result["cases"]) == 1
    assert set(result["models"]) == {f"{NAME} M_t", f"{NAME} F_t"}
    for model in result["models"].values():
        assert model["loss"][1] == model["centre"]["loss"] and 0 <= model["centre"]["dice"] <= 100
    with pytest.raises(MedSeqFTError, match="not a task of run"):
        analysis.landscape_for_runs([NAME], "509")
