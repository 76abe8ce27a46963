"""What a user asks ``medseqft run`` for: the request, its checks (all before anything is written) and the
plans names a run trains under."""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass, field

from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.method.foundation import M0_TRANSFERS, check_channels, load_foundation
from nnunetv2_medseqft.method.settings import MDSSettings, RFTSettings, key_value
from nnunetv2_medseqft.paths import fold_training_count, parse_fold, raw_dataset, require_writable, resolved
from nnunetv2_medseqft.plugin.variants import BUDGET_KEYS, MAX_BUDGET, MIN_BUDGET
from nnunetv2_medseqft.sequence.layout import check_run_name
from nnunetv2_medseqft.sequence.recipes import METHODS, get_method

FROM_M0 = ".fromM0"  # run names cannot hold '.', so these plans names never collide with a run's


def base_plans_name(foundation_sha: str) -> str:
    return f"MedSeqFTPlans-{foundation_sha[:8]}"


def run_plans_name(run: str) -> str:
    return f"MedSeqFTPlans_{run}"


def reference_plans_name(base_plans: str, settings: dict) -> str:
    """Plans of the unseen-task reference (full fine-tuning of M0): shared by every run whose foundation,
    budget, seed, fold and configuration agree, so it is trained once (under a lock) and reused."""
    keys = ("budget", "seed", "fold", "configuration", "nnunet_final_validation", "m0_transfer")
    digest = hashlib.sha256(json.dumps({k: settings[k] for k in keys if k in settings}, sort_keys=True)
                            .encode()).hexdigest()
    return f"{base_plans}{FROM_M0}-{digest[:8]}"


@dataclass
class RunRequest:
    """What the user asked for; ``settings()`` is what the manifest stores and later runs must match."""

    name: str
    method: str
    foundation: str
    datasets: list[str]
    unseen: list[str] = field(default_factory=list)
    fold: int | str = 0
    seed: int = 0
    configuration: str = "3d_fullres"
    budget: dict = field(default_factory=dict)
    rft: dict = field(default_factory=dict)
    mds: dict = field(default_factory=dict)
    mirror: bool = False
    nnunet_validation: bool = False
    device: str = "cpu"
    union_id: int | None = None
    command: str = ""
    m0_transfer: str = "full"

    @classmethod
    def from_manifest(cls, data: dict) -> "RunRequest":
        """The request a finished or interrupted run was made with (the inverse of ``settings``)."""
        st = data["settings"]
        return cls(name=data["name"], method=st["method"], foundation=resolved(data["foundation"]["path"]),
                   datasets=st["datasets"], unseen=st["unseen"], fold=st["fold"], seed=st["seed"],
                   configuration=st["configuration"], budget=st["budget"], rft=st["rft"], mds=st["mds"],
                   mirror=st["evaluation_mirroring"], nnunet_validation=st["nnunet_final_validation"],
                   command=data.get("command", ""), m0_transfer=st.get("m0_transfer", "full"))

    def settings(self, foundation_sha: str) -> dict:
        return {"method": self.method, "datasets": list(self.datasets), "unseen": list(self.unseen),
                "fold": self.fold, "seed": self.seed, "configuration": self.configuration,
                "foundation_sha256": foundation_sha, "budget": dict(self.budget), "rft": dict(self.rft),
                "mds": dict(self.mds), "evaluation_mirroring": self.mirror,
                "nnunet_final_validation": self.nnunet_validation,
                # recorded only when not stock -pretrained_weights: runs made before the setting existed match
                **({"m0_transfer": self.m0_transfer} if self.m0_transfer != "full" else {})}


def validate(request: RunRequest, writes: bool = True):
    """Every check that needs no training, before anything is written. Returns the loaded foundation.
    ``writes=False``: the request only reads the nnU-Net roots (``medseqft evaluate --out``)."""
    check_run_name(request.name)
    for root in ("nnUNet_preprocessed", "nnUNet_results") if writes else ():  # plans, buffers, models, records
        require_writable(root)
    method = get_method(request.method)
    request.fold = parse_fold(request.fold)
    if request.m0_transfer not in M0_TRANSFERS:
        raise MedSeqFTError(f"--m0-transfer {request.m0_transfer!r} does not exist; choose one of: "
                            f"{', '.join(M0_TRANSFERS)}.")
    if not request.datasets:
        raise MedSeqFTError("Give at least one dataset with --datasets.")
    foundation = load_foundation(request.foundation)
    names = {}
    for d in list(request.datasets) + list(request.unseen):
        name, dataset_json = raw_dataset(d)
        check_channels(foundation, dataset_json, name)
        names[d] = name
    request.datasets = [names[d] for d in request.datasets]
    request.unseen = [names[d] for d in request.unseen]
    for group, label in ((request.datasets, "--datasets"), (request.unseen, "--unseen")):
        repeated = sorted({n for n in group if group.count(n) > 1})
        if repeated:
            raise MedSeqFTError(f"{label} names {', '.join(repeated)} more than once.")
    overlap = sorted(set(request.datasets) & set(request.unseen))
    if overlap:
        raise MedSeqFTError(f"--unseen overlaps --datasets ({', '.join(overlap)}): an unseen task must not be "
                            "trained in the sequence. Drop it from one of them.")
    if method.union and len(request.datasets) < 2:
        raise MedSeqFTError("multitask needs at least two --datasets (it trains once on their union).")
    unknown = sorted(set(request.budget) - set(BUDGET_KEYS))
    if unknown:
        raise MedSeqFTError(f"Unknown budget keys {unknown}; known: {sorted(BUDGET_KEYS)}.")
    for key, value in request.budget.items():
        low, high = MIN_BUDGET.get(key, 1), MAX_BUDGET.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low
                                  or (high is not None and value > high)):
            what = "--no-mirroring sets mirroring to 0; it" if key == "mirroring" else \
                f"--{key.replace('num_', '').replace('_', '-')}"
            raise MedSeqFTError(f"{what} must be an integer >= {low}" + (f" and <= {high}" if high is not None else "")
                                + f", got {value!r}.")
    if request.mirror and request.budget.get("mirroring") == 0:
        raise MedSeqFTError("--mirror evaluates with test-time mirroring, which models trained with --no-mirroring "
                            "never saw. Drop one of them.")
    rft = RFTSettings.from_dict(request.rft)  # types, ranges and the names of the readings
    mds = MDSSettings.from_dict(request.mds)
    if method.lora and not method.has_fft:  # LoRA only: no F_t, no retention terms (its trainer pins these)
        moot = [f"{k}={v}" for k, v in (("student_init", "fft"), ("export", "fft"), ("budget", "fft_full"),
                                         ("g_teacher", "foundation")) if request.rft.get(k) == v]
        if moot:
            raise MedSeqFTError(f"--method {method.name} trains no F_t and no retention terms, so --rft "
                                f"{' '.join(moot)} cannot apply. Use --method medseqft, or drop them.")
    if method.lora:
        from nnunetv2_medseqft.adapters import check_rank  # peft: only where LoRA is used

        check_rank(foundation.build_ssl_network(), rft.lora_rank, rft.lora_targets)
        for d in request.datasets:
            try:
                mds.buffer_size(fold_training_count(d, request.fold))
            except MedSeqFTError as e:
                raise MedSeqFTError(f"{d}, fold {request.fold}: {e}") from None
    return foundation


def run_rft(method: str, explicit: dict) -> dict:
    """A command's --rft as the run records it: for the MedSeqFT methods with today's default readings made
    explicit where they differ from the earlier ones (``RFTSettings.run_record``); for the others as given."""
    two_stage = method in METHODS and METHODS[method].two_stage  # an unknown method is refused by validate()
    return RFTSettings.run_record(explicit, from_command=True) if two_stage else explicit


def rft_resume_flags(method: str, stored: dict) -> list[str]:
    """``--rft`` values under which today's command records ``stored`` again: a run made before a default
    changed names its readings here (its stored command alone would now mean the new defaults)."""
    if not (method in METHODS and METHODS[method].two_stage):
        return [f"{k}={v}" for k, v in stored.items()]
    today = {k: getattr(RFTSettings(), k) for k in RFTSettings.RECORDED_AGAINST}
    return [f"{k}={v}" for k, v in RFTSettings.for_trainer(stored).items() if today.get(k, object()) != v]


def request_from_args(args) -> RunRequest:
    budget = {k: v for k, v in (("num_epochs", args.epochs), ("iterations", args.iterations),
                                ("val_iterations", args.val_iterations), ("warmup_epochs", args.warmup_epochs),
                                ("mirroring", 0 if args.no_mirroring else None))
              if v is not None}
    return RunRequest(name=args.name, method=args.method, foundation=args.foundation, datasets=args.datasets,
                      unseen=args.unseen or [], fold=args.fold, seed=args.seed, configuration=args.c,
                      budget=budget, rft=run_rft(args.method, dict(key_value(t) for t in args.rft or [])),
                      mds=dict(key_value(t) for t in args.mds or []), mirror=args.mirror, device=args.device,
                      nnunet_validation=args.nnunet_validation, union_id=args.union_id, m0_transfer=args.m0_transfer,
                      command=" ".join(shlex.quote(a) for a in ["medseqft", "run"] + list(args.argv)))
