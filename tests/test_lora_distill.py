"""LoRA on nnU-Net networks (the all_modules trap, merge) and the feature distance, on the foundation's network."""

import copy
import math

import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_medseqft import adapters as lora
from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.method.distill import FeatureTaps, feature_distance
from nnunetv2_medseqft.method.foundation import load_foundation
from nnunetv2_medseqft.method.settings import RFTSettings

TARGETS = RFTSettings().lora_targets


@pytest.fixture(scope="module")
def network(tiny_foundation):
    f = load_foundation(str(tiny_foundation))
    pm = PlansManager(copy.deepcopy(f.plans))
    torch.manual_seed(0)
    net = nnUNetTrainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 1, 3, True)
    x = torch.randn(1, 1, *pm.get_configuration("3d_fullres").patch_size)
    return net.eval(), x


def _perturb_lora(student):
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)


def test_lora_changes_output_and_merge_reproduces_it(network):
    net, x = network
    plain = copy.deepcopy(net)
    reference = plain(x)[0]
    student = lora.add_lora(copy.deepcopy(net), rank=4, alpha=8, targets=TARGETS)
    assert torch.allclose(student(x)[0], reference, atol=1e-5), "LoRA starts as the identity (B = 0)"
    _perturb_lora(student)
    adapted = student(x)[0]
    # guards the all_modules trap: without the re-link LoRA would have no effect at all
    assert (adapted - reference).abs().max() > 1e-2
    merged_state = lora.merged_state_dict(student)
    assert set(merged_state) == set(plain.state_dict())
    assert all(merged_state[k].shape == v.shape for k, v in plain.state_dict().items())
    rebuilt = copy.deepcopy(plain)
    rebuilt.load_state_dict(merged_state)
    merged = lora.merge(student)
    assert type(merged) is type(plain) and set(merged.state_dict()) == set(plain.state_dict())
    assert (merged(x)[0] - adapted).abs().max() < 1e-4
    assert (rebuilt(x)[0] - adapted).abs().max() < 1e-4


def test_trainable_set_is_lora_norms_and_head(network):
    net, _ = network
    student = lora.add_lora(copy.deepcopy(net), rank=4, alpha=8, targets=TARGETS)
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and any(".seg_layers." in n for n in trainable)
    assert any(".norm." in n for n in trainable)
    assert not any(n.endswith("base_layer.weight") for n in trainable), "the base convs stay frozen"
    assert not any("transpconvs" in n for n in trainable)


def test_rank_above_layer_capacity_is_refused(network):
    net, _ = network
    with pytest.raises(MedSeqFTError, match="LoRA rank 100000 exceeds"):
        lora.add_lora(copy.deepcopy(net), rank=100000, alpha=8, targets=TARGETS)


def test_feature_distance_zero_for_equal_models_positive_otherwise(network):
    net, x = network
    teacher = copy.deepcopy(net)
    student = lora.add_lora(copy.deepcopy(net), rank=4, alpha=8, targets=TARGETS)
    taps_s, taps_t = FeatureTaps(student), FeatureTaps(teacher)
    assert len(taps_s.names) == 2 * len(net.encoder.stages) - 1  # every encoder stage + every decoder stage
    student(x)
    teacher(x)
    assert feature_distance(taps_s.collect(), taps_t.collect()).item() < 1e-8
    _perturb_lora(student)
    student(x)
    teacher(x)
    assert feature_distance(taps_s.collect(), taps_t.collect()).item() > 1e-4


def test_feature_distance_is_the_float32_definition_and_has_a_zero_gradient_at_equality():
    """mean over layers of mean((s - t)^2) / (mean(t^2) + eps), also for half-precision features (AMP)."""
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(2, 4, 8, 8, 8, generator=g), 3 * torch.randn(2, 8, 4, 4, 4, generator=g)]
    t = [torch.randn(2, 4, 8, 8, 8, generator=g), torch.randn(2, 8, 4, 4, 4, generator=g)]
    definition = torch.stack([((a - b) ** 2).mean() / ((b ** 2).mean() + 1e-6) for a, b in zip(s, t)]).mean()
    assert feature_distance(s, t).item() == pytest.approx(definition.item(), rel=1e-5)
    half = feature_distance([a.half() for a in s], [b.half() for b in t])
    assert half.dtype == torch.float32 and half.item() == pytest.approx(definition.item(), rel=1e-2)
    same = [b.clone().requires_grad_(True) for b in t]
    d = feature_distance(same, t)
    d.backward()
    assert d.item() == 0.0 and all(torch.equal(x.grad, torch.zeros_like(x)) for x in same)


def _stage_steps(network, steps: int, g_whole_batch=None, teacher_rows=None, **readings) -> list[dict]:
    """``steps`` stage-B steps of the trainers' RFTStage on a batch of two (one buffer sample), with the least an
    nnUNetTrainer gives it: device, network, loss, optimizer, no grad scaler (CPU), buffer keys.
    ``teacher_rows``: a list that gets the batch size of every generalization-teacher forward."""
    from types import SimpleNamespace

    from nnunetv2_medseqft.trainers.stages import RFTStage

    net, x = network
    torch.manual_seed(0)
    m0 = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in net.state_dict().items()}

    def build(state):
        built = copy.deepcopy(net).train()
        built.load_state_dict(state)
        return built

    settings = RFTSettings(lora_rank=4, lora_alpha=8, **readings)
    stage = RFTStage(build, net.state_dict(), net.state_dict(), settings, distill=True, g_teacher=m0)
    stage.g_whole_batch = g_whole_batch
    if teacher_rows is not None:
        stage.teacher_prev.register_forward_pre_hook(lambda m, i: teacher_rows.append(i[0].shape[0]))
        stage.teacher_prev.encoder.register_forward_pre_hook(lambda m, i: teacher_rows.append(i[0].shape[0]))
    params = [p for p in stage.student.parameters() if p.requires_grad]
    trainer = SimpleNamespace(device=torch.device("cpu"), network=stage.student, grad_scaler=None,
                              loss=lambda out, _target: out[0].float().pow(2).mean(), buffer_keys=["buffer"],
                              optimizer=torch.optim.SGD(params, 0.1, momentum=0.9))
    batch = {"data": torch.cat([x.flip(-1), x]), "target": torch.zeros(1), "keys": ["task", "buffer"]}
    return [stage.train_step(trainer, batch) for _ in range(steps)]


def test_retention_every_alternates_the_terms_and_weighs_them_up(network):
    every_step = _stage_steps(network, 2, retention_every=1)
    assert all(not math.isnan(o["medseqft_k"]) and not math.isnan(o["medseqft_g"]) for o in every_step)
    out = _stage_steps(network, 4, retention_every=2)
    computed = [(not math.isnan(o["medseqft_k"]), not math.isnan(o["medseqft_g"])) for o in out]
    assert computed == [(True, False), (False, True), (True, False), (False, True)]
    for o in out[1:]:  # the student has moved from F_t: both distances are > 0 from step 1 on
        term = o["medseqft_k"] if not math.isnan(o["medseqft_k"]) else o["medseqft_g"]
        assert term > 0 and float(o["loss"]) == pytest.approx(o["medseqft_seg"] + 2 * term, rel=1e-5)
    with pytest.raises(MedSeqFTError, match="retention_every must be >= 1"):
        RFTSettings(retention_every=0)


def test_generalization_teacher_on_the_whole_batch_gives_the_buffer_rows_term(network):
    """On CPU the teacher runs the whole batch (a one-sample 3D conv takes PyTorch's slow kernel) and the term takes
    its buffer rows: the same loss as running the buffer rows alone, which GPUs do."""
    rows = {}
    out = {}
    for whole in (True, False):
        rows[whole] = []
        out[whole] = _stage_steps(network, 1, g_whole_batch=whole, teacher_rows=rows[whole], retention_every=1)[0]
    assert rows == {True: [2], False: [1]}  # g_layers=encoder: the encoder alone runs
    assert out[True]["medseqft_g"] > 0 and out[True]["medseqft_g"] == pytest.approx(out[False]["medseqft_g"], rel=1e-4)
    rows[None] = []
    _stage_steps(network, 1, teacher_rows=rows[None], retention_every=1)
    assert rows[None] == [2]  # the CPU default


def test_encoder_taps_fill_from_the_encoder_alone(network):
    """g_layers=encoder: the teacher's taps cover its encoder stages, and running its encoder alone fills them."""
    net, x = network
    student, teacher = FeatureTaps(net), FeatureTaps(copy.deepcopy(net), "encoder")
    assert teacher.names == [n for n in student.names if n.startswith("encoder.")]
    assert len(teacher.names) == len(net.encoder.stages)
    net(x)
    teacher_net = copy.deepcopy(net)
    taps = FeatureTaps(teacher_net, "encoder")
    teacher_net.encoder(x)
    feats = student.collect()
    selected = [feats[student.names.index(n)] for n in taps.names]
    assert feature_distance(selected, taps.collect()).item() < 1e-8
    student.remove()


def test_negative_lambdas_refused():
    with pytest.raises(MedSeqFTError, match="lambda_k and lambda_g must be >= 0"):
        RFTSettings(lambda_g=-1.0)


def test_with_decoder_puts_one_models_encoder_under_anothers_decoder(network):
    """The encoder-only R matrix: a later body's encoder runs under an earlier task's own decoder and head."""
    from nnunetv2_medseqft.checkpoints import with_decoder
    from nnunetv2_medseqft.evaluation.metrics import encoder_bwt

    net, x = network
    early, late = copy.deepcopy(net).state_dict(), copy.deepcopy(net)
    with torch.no_grad():
        for p in late.parameters():
            p.add_(0.1)
    late = late.state_dict()
    mixed = copy.deepcopy(net)
    mixed.load_state_dict(with_decoder(late, early), strict=True)
    for name, value in mixed.state_dict().items():
        source = late if name.startswith(("encoder.", "decoder.encoder.")) else early
        assert torch.equal(value, source[name]), name
    assert any(n.startswith("decoder.stages.") for n in early) and any(n.startswith("encoder.") for n in early)
    # the encoder's features are the late model's, the output the early decoder's on them
    with torch.no_grad():
        late_net = copy.deepcopy(net)
        late_net.load_state_dict(late)
        assert torch.allclose(mixed.encoder(x)[-1], late_net.encoder(x)[-1])
        assert not torch.allclose(mixed(x)[0], late_net(x)[0])
    # BWT of the encoder: final row of the encoder-only matrix against each task's own score
    r = [[0.0, 0.0, 0.0], [80.0, 5.0, 1.0], [0.0, 70.0, 2.0], [0.0, 0.0, 60.0]]
    r_encoder = [[None] * 3, [80.0, None, None], [75.0, 70.0, None], [72.0, 64.0, 60.0]]
    assert encoder_bwt(r, r_encoder) == pytest.approx(((72 - 80) + (64 - 70)) / 2)
    assert encoder_bwt(r, [[None] * 3] * 4) is None and encoder_bwt(r[:2], r_encoder[:2]) is None
