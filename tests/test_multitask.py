"""The multitask reference: the marginal loss for partial labels, and a real multitask run on the union dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from nnunet_helpers import manifest, run, run_cmd, run_python, runner_code
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2_medseqft.trainers.multitask import MarginalLoss, MedSeqFTMultitaskTrainer, marginalise

from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.sequence.union_dataset import UNION_KEY, unannotated_labels

# a union of a liver task (label 1) and a spleen task (label 2), as build_union_dataset writes it
UNION_JSON = {"name": "Dataset999_Union-t", "labels": {"background": 0, "liver": 1, "spleen": 2},
              UNION_KEY: {"tasks": ["Dataset501_MSFTLiver", "Dataset502_MSFTSpleen"],
                          "label_maps": {"Dataset501_MSFTLiver": {"1": 1}, "Dataset502_MSFTSpleen": {"1": 2}}}}


def nnunet_loss():
    return DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss)


def test_each_case_gives_only_the_labels_its_task_did_not_annotate_to_the_background():
    assert unannotated_labels(UNION_JSON) == {"Dataset501": [2], "Dataset502": [1]}
    with pytest.raises(MedSeqFTError, match="not a multitask union dataset"):
        unannotated_labels({"name": "Dataset501_MSFTLiver", "labels": {"background": 0, "liver": 1}})
    with pytest.raises(MedSeqFTError, match="not a multitask union dataset"):  # refused before nnU-Net's set-up
        MedSeqFTMultitaskTrainer({}, "3d_fullres", 0, {"labels": {"background": 0, "liver": 1}}, torch.device("cpu"))


def test_marginalised_softmax_is_the_marginal_of_the_full_one():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    unannotated = torch.tensor([[False, False, True], [False, True, False]])
    full, merged = torch.softmax(logits, 1), torch.softmax(marginalise(logits, unannotated), 1)
    assert torch.allclose(merged[0, 0], full[0, 0] + full[0, 2], atol=1e-6)  # case 0: spleen counts as background
    assert torch.allclose(merged[0, 1], full[0, 1], atol=1e-6) and merged[0, 2].max() < 1e-6
    assert torch.allclose(merged[1, 0], full[1, 0] + full[1, 1], atol=1e-6) and merged[1, 1].max() < 1e-6
    merged[0, 0].sum().backward()
    assert logits.grad[0, 2].abs().sum() > 0  # the unannotated label's logit still learns through the background


def test_an_organ_another_task_annotated_is_not_penalised_as_background():
    """A spleen-task case shows the liver (labelled background there): predicting liver costs the plain merge, not
    the marginal loss; predicting liver where the spleen is still costs both."""
    target = torch.zeros(1, 1, 4, 4, 4)
    target[0, 0, :2] = 2  # spleen in the first half; the liver, unannotated, in the second
    logits = torch.full((1, 3, 4, 4, 4), -5.0)
    logits[0, 2, :2] = 5.0
    logits[0, 1, 2:] = 5.0  # the model segments the liver where the spleen task says "background"
    marginal = MarginalLoss(DeepSupervisionWrapper(nnunet_loss(), [1.0]), unannotated_labels(UNION_JSON))
    marginal.cases = ["Dataset502_case_003"]
    plain = DeepSupervisionWrapper(nnunet_loss(), [1.0])
    assert marginal([logits], [target]) < plain([logits], [target]) - 1.0
    wrong = logits.clone()
    wrong[0, 2, :2], wrong[0, 1, :2] = -5.0, 5.0  # liver predicted where the spleen is
    assert marginal([wrong], [target]) > marginal([logits], [target]) + 1.0
    marginal.cases = ["Dataset777_case_003"]
    with pytest.raises(MedSeqFTError, match="belongs to no task"):
        marginal([logits], [target])


def test_multitask_run_trains_the_union_with_the_marginal_loss(nnunet, tiny_foundation):
    run(run_cmd(tiny_foundation, "t-multitask", "multitask"), nnunet)
    record = manifest(nnunet, "t-multitask")
    assert record["marginal_multitask"] is True
    model = Path(record["steps"]["train/union"]["outputs"]["model"]["path"])
    assert model.parent.parent.name.startswith("MedSeqFTMultitaskTrainer__")
    assert torch.load(model, map_location="cpu", weights_only=False)["trainer_name"] == "MedSeqFTMultitaskTrainer"
    results = json.loads((nnunet.results / "medseqft_runs" / "t-multitask" / "results.json").read_text())
    for task, scores in results["scores"].items():
        assert 0 <= scores["M"]["mean"]["dice"] <= 100, task
    # a multitask run begun before the marginal loss (no mark in its manifest) resumes with its plain-merge trainer
    code = runner_code(run_cmd(tiny_foundation, "t-multitask", "multitask"),
                       nnunet.results / "medseqft_runs" / "t-multitask", """
from nnunetv2_medseqft.sequence.manifest import MARGINAL_MULTITASK
union = manifest.step("union")["outputs"]["dataset"]
print(new_runner()._trainer(union))
del manifest.data[MARGINAL_MULTITASK]
print(new_runner()._trainer(union))
""")
    assert run_python(code, nnunet).stdout.split()[-2:] == ["MedSeqFTMultitaskTrainer", "MedSeqFTFFTTrainer"]
