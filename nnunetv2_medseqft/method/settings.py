"""The method's settings, typed and JSON round-tripping (plans sections, checkpoints, buffer files):
``MDSSettings`` (buffer selection, plans' ``medseqft.mds``) and ``RFTSettings`` (the task step, stage A
FFT and stage B K&G RFT, plans' ``medseqft.rft``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from nnunetv2_medseqft.errors import MedSeqFTError


class JsonSettings:
    """Mixin for frozen dataclasses: ``to_dict`` / ``from_dict`` that refuses unknown keys (typos)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        types = {f.name: f.type for f in fields(cls)}
        unknown = set(d) - set(types)
        if unknown:
            raise MedSeqFTError(f"Unknown {cls.__name__} keys {sorted(unknown)}; known: {sorted(types)}.")
        for name, value in d.items():
            _check_type(getattr(cls, "label", cls.__name__), name, value, types[name])
        return cls(**d)


def key_value(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` from the command line (``--rft``, ``--mds``, ``--ssl``): numbers, none/true/false, else text."""
    if "=" not in text:
        raise MedSeqFTError(f"Bad setting {text!r}: use KEY=VALUE, e.g. lambda_g=0.5.")
    key, value = text.split("=", 1)
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, {"none": None, "true": True, "false": False}.get(value.lower(), value)


_KINDS = {"int": ((int,), "an integer"), "float": ((int, float), "a number"), "str": ((str,), "a string"),
          "bool": ((bool,), "true or false"), "None": ((type(None),), "none")}


def _check_type(owner: str, name: str, value, annotation: str) -> None:
    """A value of the field's declared type (``int | None`` etc.): a wrong one fails here, with its name,
    rather than as a TypeError deep inside training."""
    allowed = [a.strip() for a in str(annotation).split("|")]
    for a in allowed:
        kinds = _KINDS.get(a, ((object,), a))[0]
        if isinstance(value, kinds) and (a == "bool" or not isinstance(value, bool)):
            return
    words = " or ".join(_KINDS.get(a, (None, a))[1] for a in allowed)
    raise MedSeqFTError(f"{owner} {name}={value!r} must be {words}.")


MDS_RULES = ("zone", "epsilon")  # how a near-tie settles: mds._open_pairs


@dataclass(frozen=True)
class MDSSettings(JsonSettings):
    """k: buffer size (absolute); when None, k = max(min_k, round(k_frac * training cases)).
    repeats: fixed number of SSL-loss draws per case (1000 = the paper's protocol); None = adaptive:
        draw in batches of ``draws_per_batch`` (at least ``min_repeats``) until every (buffer, non-buffer)
        pair is settled at ``confidence`` on its common draws, or ``max_repeats`` draws. ``tolerance`` is the
        indifference zone: a pair whose difference is known to within tolerance * boundary counts as settled
        (near-ties are interchangeable; without it they would run to max_repeats). ``rule``: how a near-tie
        settles (``zone``: its difference known to within the zone; ``epsilon``: the buffer case at most the
        zone worse). The rules: ``mds.py``.
    seed: makes patches and masks, hence scores and buffer, reproducible."""

    label = "MDS setting"  # for messages (--mds KEY=VALUE); a class attribute, not a field

    k: int | None = None
    k_frac: float = 0.2
    min_k: int = 2
    repeats: int | None = None
    min_repeats: int = 16
    max_repeats: int = 1000
    draws_per_batch: int = 8
    confidence: float = 0.95
    tolerance: float = 0.02
    rule: str = "epsilon"
    seed: int = 0

    def __post_init__(self):
        if self.k is not None and self.k < 1:
            raise MedSeqFTError(f"MDS k must be >= 1, got {self.k}.")
        if not 0.0 < self.k_frac <= 1.0:
            raise MedSeqFTError(f"MDS k_frac must lie in (0, 1], got {self.k_frac}.")
        if self.repeats is not None and self.repeats < 1:
            raise MedSeqFTError(f"MDS repeats must be >= 1, got {self.repeats}.")
        if not 1 <= self.min_repeats <= self.max_repeats:
            raise MedSeqFTError(f"MDS needs 1 <= min_repeats <= max_repeats, got {self.min_repeats}, {self.max_repeats}.")
        if self.draws_per_batch < 1:
            raise MedSeqFTError(f"MDS draws_per_batch must be >= 1, got {self.draws_per_batch}.")
        if not 0.0 <= self.tolerance < 1.0:
            raise MedSeqFTError(f"MDS tolerance must lie in [0, 1), got {self.tolerance}.")
        if self.rule not in MDS_RULES:
            raise MedSeqFTError(f"MDS rule={self.rule!r} is not a rule; use one of {list(MDS_RULES)}.")
        if not 0.5 < self.confidence < 1.0:
            raise MedSeqFTError(f"MDS confidence must lie in (0.5, 1), got {self.confidence}.")

    def to_dict(self) -> dict:
        """Without ``rule`` when it is "zone" (the only rule before rules were a setting) or when no rule applies
        (fixed repeats): buffer keys and plans written before still match, and runs made before resume."""
        d = asdict(self)
        if d["rule"] == "zone" or d["repeats"] is not None:
            del d["rule"]
        return d

    def buffer_size(self, n_training_cases: int) -> int:
        """K for a fold. A K above the number of training cases is an error, not a silent clamp."""
        k = self.k if self.k is not None else max(self.min_k, round(self.k_frac * n_training_cases))
        if k > n_training_cases:
            raise MedSeqFTError(f"MDS buffer size k={k} exceeds the fold's {n_training_cases} training cases. "
                                f"Use a smaller --k (or --k-frac).")
        return k


@dataclass(frozen=True)
class RFTSettings(JsonSettings):
    """stage_b_fraction: share of the trainer's epochs spent in stage B (the rest is stage A, FFT).
    lora_rank / lora_alpha / lora_targets: peft LoRA on every stage convolution of encoder and decoder
        (the regex matches ``...stages...conv``, and ResidualEncoderUNet's stem and 1x1x1 skip convs; transposed
        convs are not supported by peft).
    lambda_k: weight of knowledge retention (student vs F_t features on every sample of the batch).
    lambda_g: weight of generalization retention (student vs M_{t-1} features on buffer samples).
    buffer: 'mds' (lowest SSL loss under the foundation) or 'random' (the MDS ablation).
    buffer_share: expected share of buffer samples in a stage-B batch (buffer cases are over-sampled).
    The readings of the method that the paper leaves open (``METHOD.md``), each a setting; the defaults are the
    ones chosen on fold 0 (README, "Method choices"):
    student_init: 'fft' (student = F_t + LoRA) or 'previous' (student = M_{t-1} + LoRA, head from F_t: each
        task model is a low-rank update of the last, so a chain packs as adapters, but it re-learns the task
        through that update).
    g_teacher: 'foundation' (M0, recorded in the plans) or 'previous' (M_{t-1}) on the buffer samples.
    g_layers: the stages the generalization term compares: 'encoder' (the teacher's decoder is not run: M0's
        decoder was trained to reconstruct, and a task started from M0's encoder never had it) or 'all' (encoder
        and decoder).
    k_layers: the stages the knowledge term compares: 'encoder' (F_t's decoder is not run: the teachers then cost
        two encoder forwards, about half of one full forward) or 'all' (encoder and decoder).
    export: 'merged' (checkpoint_final.pth = M_t) or 'fft' (checkpoint_final.pth = F_t; M_t's adapter is kept).
    budget: 'fft_full' (stage A trains the full budget, as the FFT baselines do, and stage B runs on top for the
        epochs it would have taken, stage_b_fraction of the trainer's epochs) or 'split' (stage B takes its
        epochs out of the trainer's).
    stage_b_optimizer / stage_b_lr: SGD (nnU-Net's, momentum 0.99) or AdamW for the stage-B parameters, with a
        poly schedule; stage_b_lr None = the trainer's initial_lr for SGD, 1e-3 for AdamW.
    retention_every: N > 1 computes each retention term on every N-th stage-B step only (the knowledge term on
        steps 0, N, 2N..., the generalization term on steps N//2, N//2 + N, ...), weighted N: the same expected
        gradient for 1/N of the teachers' cost, with more variance. 1 = both terms on every step. 2: stage B
        1.19x a stock step on 2 CPU cores and 1.16x on an H200 (1.29x / 1.31x with 1), no loss of Dice measured
        (fold 0 ablation; fold-1 protocol rerun, README "Method choices")."""

    CHOICES = {"buffer": ("mds", "random"), "student_init": ("fft", "previous"),
               "g_teacher": ("foundation", "previous"), "g_layers": ("encoder", "all"), "k_layers": ("encoder", "all"),
               "export": ("merged", "fft"),
               "budget": ("fft_full", "split"), "stage_b_optimizer": ("sgd", "adamw")}  # a class attribute, not a field

    label = "K&G RFT setting"  # for messages (--rft KEY=VALUE); a class attribute, not a field
    # the readings' defaults before they were chosen on fold 0: a run manifest stores its readings as differences
    # from these, so that runs made before still match, and resume, under the readings they were trained with
    RECORDED_AGAINST = {"student_init": "previous", "g_teacher": "previous", "g_layers": "all", "export": "merged",
                        "budget": "split", "k_layers": "all", "retention_every": 1}

    stage_b_fraction: float = 0.3
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = r".*(stages|stem).*\.conv"
    lambda_k: float = 1.0
    lambda_g: float = 1.0
    buffer: str = "mds"
    buffer_share: float = 0.5
    student_init: str = "fft"
    g_teacher: str = "foundation"
    g_layers: str = "encoder"
    k_layers: str = "encoder"
    export: str = "merged"
    budget: str = "fft_full"
    stage_b_optimizer: str = "sgd"
    stage_b_lr: float | None = None
    retention_every: int = 2

    @classmethod
    def run_record(cls, rft: dict, from_command: bool) -> dict:
        """What a run manifest stores: the explicit settings, plus every reading that differs from
        ``RECORDED_AGAINST``. A command's missing readings are today's defaults; a manifest's are the old ones."""
        readings = {k: getattr(cls(), k) for k in cls.RECORDED_AGAINST} if from_command else dict(cls.RECORDED_AGAINST)
        readings.update({k: v for k, v in rft.items() if k in readings})
        return {**{k: v for k, v in rft.items() if k not in readings},
                **{k: v for k, v in readings.items() if v != cls.RECORDED_AGAINST[k]}}

    @classmethod
    def for_trainer(cls, recorded: dict) -> dict:
        """A run's recorded settings with every reading explicit: what the trainer trains does not depend on
        its defaults."""
        return {**cls.RECORDED_AGAINST, **recorded}

    def stage_b_extra_epochs(self, epochs: int) -> int:
        """Epochs that stage B adds on top of a two-stage trainer's ``epochs`` (budget=fft_full; else none)."""
        return epochs - int(round(epochs * (1 - self.stage_b_fraction))) if self.budget == "fft_full" else 0

    def __post_init__(self):
        if not 0.0 <= self.stage_b_fraction <= 1.0:
            raise MedSeqFTError(f"stage_b_fraction must lie in [0, 1], got {self.stage_b_fraction}.")
        if self.lora_rank < 1:
            raise MedSeqFTError(f"lora_rank must be >= 1, got {self.lora_rank}.")
        if self.lambda_k < 0 or self.lambda_g < 0:
            raise MedSeqFTError(f"lambda_k and lambda_g must be >= 0 (got {self.lambda_k}, {self.lambda_g}): "
                                "they weigh distances that are minimised. Set 0 to switch a term off.")
        for name, allowed in self.CHOICES.items():
            if getattr(self, name) not in allowed:
                raise MedSeqFTError(f"{self.label} {name}={getattr(self, name)!r} does not exist; "
                                    f"choose one of: {', '.join(allowed)}.")
        if self.stage_b_lr is not None and self.stage_b_lr <= 0:
            raise MedSeqFTError(f"stage_b_lr must be > 0 (or none for the default), got {self.stage_b_lr}.")
        if self.retention_every < 1:
            raise MedSeqFTError(f"retention_every must be >= 1 (1: every stage-B step), got {self.retention_every}.")
        if not 0.0 < self.buffer_share < 1.0:
            raise MedSeqFTError(f"buffer_share must lie in (0, 1), got {self.buffer_share}.")
