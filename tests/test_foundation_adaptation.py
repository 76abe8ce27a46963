"""Tasks with other input channels than the foundation: ``medseqft adapt-foundation`` (replicate-and-scale of the
input convolution, the foundation's normalisation made explicit), then the plugin's route with the adapted M0."""

import json
import os
import shutil

import pytest
import torch
from conftest import FIRST_TASK_ID
from nnunet_helpers import run

from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.method.foundation import check_channels, load_foundation
from nnunetv2_medseqft.method.foundation_adaptation import adapt_foundation

TWO_CHANNEL_ID = 518


@pytest.fixture(scope="module")
def two_channel_task(nnunet):
    """The first task with a second CT channel (the same image: what the check below needs)."""
    src = next(nnunet.raw.glob(f"Dataset{FIRST_TASK_ID}_*"))
    dst = nnunet.raw / f"Dataset{TWO_CHANNEL_ID}_LiverTwoChannel"
    shutil.copytree(src, dst, symlinks=True)
    for image in sorted((dst / "imagesTr").glob("*_0000.nii.gz")):
        shutil.copy(image, image.with_name(image.name.replace("_0000", "_0001")))
    meta = json.loads((dst / "dataset.json").read_text())
    meta["channel_names"] = {"0": "CT", "1": "CT"}
    (dst / "dataset.json").write_text(json.dumps(meta))
    return dst


def test_two_channel_task_on_a_one_channel_foundation(nnunet, tiny_foundation, two_channel_task, tmp_path):
    refused = run(["medseqft", "plan", "-d", str(TWO_CHANNEL_ID), "--foundation", str(tiny_foundation)], nnunet,
                  check=False)
    assert refused.returncode == 2 and "adapt-foundation" in refused.stderr and "--channels replicate" in refused.stderr

    run(["medseqft", "adapt-foundation", "--foundation", str(tiny_foundation), "-d", str(TWO_CHANNEL_ID),
         "--channels", "replicate", "-o", str(tmp_path / "m0_2ch")], nnunet)
    adapted_path = tmp_path / "m0_2ch" / "checkpoint_final.pth"
    m0, adapted = load_foundation(str(tiny_foundation)), load_foundation(str(adapted_path))
    assert adapted.num_input_channels == 2
    assert adapted.checkpoint["medseqft"]["adapted_from"]["sha256"] == m0.sha256
    patch = m0.plans["configurations"]["3d_fullres"]["patch_size"]
    x = torch.randn(1, 1, *patch)
    with torch.no_grad():  # the same image on both channels: exactly the foundation's output, on both outputs
        ours, theirs = adapted.build_ssl_network()(x.repeat(1, 2, 1, 1, 1)), m0.build_ssl_network()(x)
    assert (ours - theirs.repeat(1, 2, 1, 1, 1)).abs().max() < 1e-4

    plans_name = "MedSeqFTPlans_2ch"
    run(["medseqft", "plan", "-d", str(TWO_CHANNEL_ID), "--foundation", str(adapted_path), "--plans-name", plans_name],
        nnunet)
    plans = json.loads(next(nnunet.preprocessed.glob(f"Dataset{TWO_CHANNEL_ID}_*/{plans_name}.json")).read_text())
    assert plans["configurations"]["3d_fullres"]["normalization_schemes"] == ["CTNormalization"] * 2
    assert plans["medseqft"]["foundation"]["adapted_from"]["channel_adaptation"] == "replicate"
    run(["medseqft", "select", "-d", str(TWO_CHANNEL_ID), "-f", "0", "-p", plans_name, "--repeats", "2"], nnunet)
    run(["nnUNetv2_train", str(TWO_CHANNEL_ID), "3d_fullres", "0", "-tr", "MedSeqFTFFTTrainer_tiny", "-p", plans_name,
         "-pretrained_weights", str(adapted_path), "-device", "cpu"], nnunet)
    assert next(nnunet.results.glob(f"Dataset{TWO_CHANNEL_ID}_*/MedSeqFTFFTTrainer_tiny__{plans_name}__3d_fullres/"
                                    "fold_0/checkpoint_final.pth"))

    before = adapted_path.read_bytes()
    again = run(["medseqft", "adapt-foundation", "--foundation", str(tiny_foundation), "-d", str(TWO_CHANNEL_ID),
                 "--channels", "replicate", "-o", str(tmp_path / "m0_2ch")], nnunet, check=False)
    assert again.returncode == 2 and "never overwritten" in again.stderr and adapted_path.read_bytes() == before


def test_another_modality_needs_the_foundations_normalisation_made_explicit(tiny_foundation, tmp_path):
    m0 = load_foundation(str(tiny_foundation))
    mr = {"channel_names": {"0": "MR"}, "labels": {"background": 0, "liver": 1}}
    with pytest.raises(MedSeqFTError, match="adapt-foundation"):
        check_channels(m0, mr, "DatasetMR")
    with pytest.raises(MedSeqFTError, match="--normalization foundation"):
        adapt_foundation(m0, mr, "DatasetMR", str(tmp_path / "a.pth"))
    assert not os.path.exists(tmp_path / "a.pth")
    adapted = load_foundation(adapt_foundation(m0, mr, "DatasetMR", str(tmp_path / "a.pth"),
                                               normalization="foundation"))
    check_channels(adapted, mr, "DatasetMR")  # accepted now, and the plans keep the foundation's CT preprocessing
    assert adapted.plans["configurations"]["3d_fullres"]["normalization_schemes"] == ["CTNormalization"]
    assert adapted.checkpoint["medseqft"]["adapted_from"]["normalization"] == "foundation"
    with pytest.raises(MedSeqFTError, match="already fits"):
        adapt_foundation(m0, m0.dataset_json, "DatasetCT", str(tmp_path / "b.pth"), normalization="foundation")
