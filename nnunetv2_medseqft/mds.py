"""MDS (Maximum Data Similarity): choose the buffer B_t of the training cases that look most like pre-training data.

Every training case of the fold (never a validation case) is scored with the foundation M0's own SSL
loss: a random patch (plans patch size) and a random block mask (the foundation's SSL settings),
masked reconstruction MSE, computed by ``ssl.ssl_losses``, the function pre-training optimises. The score of a
case is its mean loss over many such draws; the buffer is the K cases with the lowest means.

Fixed mode (``repeats=R``): R draws for every case (the paper: about 1000).

Adaptive mode (``repeats=None``, the default). Draws come in batches of ``draws_per_batch`` (one case
per forward). Every case first gets ``min_repeats`` draws; then, after each round:

  * m_i, se_i = mean and standard error (sample std / sqrt(n_i)) of case i's losses;
  * b = midpoint between the K-th and the (K+1)-th smallest mean (the buffer boundary);
  * z = Phi^-1(1 - alpha / (2 n)), alpha = 1 - confidence: a two-sided interval per case, Bonferroni
    corrected over the n cases (n = 100, confidence 0.99: z = 3.89);
  * case i is *settled* when its interval m_i +- z se_i lies entirely on one side of b, or is no
    wider than the indifference zone tolerance * |b| (``MDSSettings.tolerance``, 2%).
Only unsettled cases get another batch; scoring stops when every case is settled or has
``max_repeats`` draws. Settled cases are re-checked every round, because b moves.

Guarantee (approximate). If every interval covers its case's true mean (probability >= confidence by
the union bound, with the CLT's normal approximation for each mean), and every interval lies on one
side of b, then all selected true means < b < all other true means: the buffer is exactly the top-K
set by expected loss. Cases settled by the indifference zone weaken this to: every selected true
mean < b (1 + 2 tolerance) and every other > b (1 - 2 tolerance), i.e. near-ties may swap. It is
approximate because (1) the normal approximation is poor for small ``min_repeats``, (2) looking
after every round (optional stopping) inflates the error somewhat, which the Bonferroni factor only
partly absorbs. Cases whose true means are (near) tied at the boundary
would never settle without the indifference zone; with it they stop once known to within it. The
benchmark (benchmarks/bench_mds.py) measures the agreement with fixed R = 1000.

Determinism: each case has its own random streams (patch positions, masks) seeded from (seed, case
key), so a case's draws do not depend on the other cases, the fold or the order of scoring; the first
n draws of adaptive mode are exactly the first n draws of fixed mode.

The result is one JSON file next to ``splits_final.json`` (never inside the data folder, where an extra
file breaks nnU-Net's loader): ``mds_buffer__<plans>__<configuration>__fold<F>.json``. Its ``key``
(plans, configuration, fold, foundation sha256, SSL and MDS settings, patch size, training cases)
decides reuse: same key -> the stored record is returned; any difference -> recomputed and overwritten.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Callable

import numpy as np
import torch

from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.foundation import Foundation, architecture_mismatches, load_foundation
from nnunetv2_medseqft.jsonio import write_json_atomic
from nnunetv2_medseqft.mds_settings import MDSSettings
from nnunetv2_medseqft.ssl import random_patch, ssl_losses

FORMAT = "medseqft-mds-buffer/1"
SPLIT_SEED = 12345  # nnUNetTrainer.do_split


# ---------------------------------------------------------------- locations and inputs

def dataset_name(dataset_name_or_id) -> str:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        return maybe_convert_to_dataset_name(str(dataset_name_or_id))
    except (RuntimeError, ValueError) as e:
        raise MedSeqFTError(f"Unknown dataset {dataset_name_or_id}: {e} Check the id, $nnUNet_raw and "
                            "$nnUNet_preprocessed.") from e


def preprocessed_root() -> str:
    root = os.environ.get("nnUNet_preprocessed")
    if not root:
        raise MedSeqFTError("$nnUNet_preprocessed is not set: export it (the folder that holds DatasetXXX_Name/).")
    return root


def parse_fold(fold) -> int | str:
    if fold == "all":
        return "all"
    try:
        value = int(fold)
    except (TypeError, ValueError):
        value = -1
    if value < 0 or str(fold).strip() != str(value):
        raise MedSeqFTError(f"Bad fold {fold!r}: use an integer >= 0 (0-4 for nnU-Net's 5-fold split) or 'all'.")
    return value


def buffer_file_path(dataset_name_or_id, fold, plans_name: str = "MedSeqFTPlans",
                     configuration: str = "3d_fullres") -> str:
    """Next to splits_final.json: ``$nnUNet_preprocessed/<dataset>/mds_buffer__<plans>__<cfg>__fold<F>.json``."""
    name = dataset_name(dataset_name_or_id)
    return os.path.join(preprocessed_root(), name,
                        f"mds_buffer__{plans_name}__{configuration}__fold{parse_fold(fold)}.json")


def training_cases(dataset_folder: str, data_folder: str, fold: int | str, log: Callable = print) -> list[str]:
    """The fold's training case ids, exactly as nnUNetTrainer.do_split chooses them (splits_final.json)."""
    return fold_split(dataset_folder, data_folder, fold, log)[0]


def fold_split(dataset_folder: str, data_folder: str, fold: int | str,
               log: Callable = print) -> tuple[list[str], list[str]]:
    """(training, validation) case ids of a fold, exactly as nnUNetTrainer.do_split chooses them."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    all_keys = sorted(infer_dataset_class(data_folder).get_identifiers(data_folder))
    if fold == "all":
        return all_keys, all_keys
    splits_file = os.path.join(dataset_folder, "splits_final.json")
    if os.path.isfile(splits_file):
        with open(splits_file) as f:
            splits = json.load(f)
    else:
        try:
            splits = generate_crossval_split(all_keys, seed=SPLIT_SEED, n_splits=5)
        except ValueError as e:  # sklearn: fewer cases than folds
            raise MedSeqFTError(f"Cannot make nnU-Net's 5-fold split of {len(all_keys)} cases ({e}). "
                                "Use fold 'all' or write your own splits_final.json.") from e
        splits = [{k: [str(c) for c in v] for k, v in s.items()} for s in splits]
        write_json_atomic(splits, splits_file)  # the same file nnUNetTrainer would write at first training
        log(f"MDS: created nnU-Net's 5-fold split {splits_file}")
    if fold < len(splits):
        keys = [str(k) for k in splits[fold]["train"]]
        val = [str(k) for k in splits[fold]["val"]]
    else:  # nnU-Net's seeded 80:20 split for folds beyond the split file
        rnd = np.random.RandomState(seed=SPLIT_SEED + fold)
        idx_tr = rnd.choice(len(all_keys), int(len(all_keys) * 0.8), replace=False)
        keys = [all_keys[i] for i in idx_tr]
        val = [all_keys[i] for i in sorted(set(range(len(all_keys))) - set(idx_tr))]
    missing = sorted((set(keys) | set(val)) - set(all_keys))
    if missing:
        raise MedSeqFTError(f"splits_final.json names cases without preprocessed data in {data_folder}: "
                            f"{missing[:5]}. Re-run medseqft plan, or fix/delete {splits_file}.")
    return sorted(keys), sorted(val)


@dataclass
class MDSInputs:
    """Everything a buffer depends on, checked. ``key`` decides whether a stored buffer is still valid."""

    dataset_name: str
    dataset_folder: str
    data_folder: str
    plans: dict
    plans_name: str
    configuration: str
    fold: int | str
    foundation: Foundation
    settings: MDSSettings
    cases: list[str]
    k: int
    key: dict = field(default_factory=dict)


def _replan_hint(name: str, foundation_path: str | None) -> str:
    return f"medseqft plan -d {name} --foundation {foundation_path or 'PATH/TO/foundation/checkpoint_final.pth'}"


def prepare(dataset_name_or_id, fold, plans_name: str = "MedSeqFTPlans", configuration: str = "3d_fullres",
            foundation_path: str | None = None, settings: MDSSettings | None = None,
            log: Callable = print) -> MDSInputs:
    """Check that the dataset was planned + preprocessed for this foundation; resolve the fold's cases and K."""
    name = dataset_name(dataset_name_or_id)
    fold = parse_fold(fold)
    dataset_folder = os.path.join(preprocessed_root(), name)
    plans_file = os.path.join(dataset_folder, f"{plans_name}.json")
    if not os.path.isfile(plans_file):
        raise MedSeqFTError(f"No plans {plans_file}: {name} is not planned for a foundation. "
                            f"Run: {_replan_hint(name, foundation_path)}")
    with open(plans_file) as f:
        plans = json.load(f)
    section = plans.get("medseqft") or {}
    recorded = section.get("foundation") or {}
    if not recorded.get("sha256"):
        raise MedSeqFTError(f"{plans_file} has no medseqft foundation section: these plans were not made by "
                            f"medseqft plan. Run: {_replan_hint(name, foundation_path)}")
    foundation_path = foundation_path or recorded.get("path")
    if not foundation_path or not os.path.isfile(foundation_path):
        raise MedSeqFTError(f"Foundation checkpoint {foundation_path} (recorded in {plans_file}) not found. "
                            "Pass --foundation PATH if it moved.")
    foundation = load_foundation(foundation_path)
    if foundation.sha256 != recorded["sha256"]:
        raise MedSeqFTError(f"{plans_file} was planned for foundation sha256 {recorded['sha256'][:12]}... but "
                            f"{foundation.path} has sha256 {foundation.sha256[:12]}...: another foundation. Re-plan "
                            f"with {_replan_hint(name, foundation.path)}, or pass the foundation it was planned with.")
    if configuration not in plans.get("configurations", {}):
        raise MedSeqFTError(f"{plans_file} has no configuration '{configuration}' "
                            f"(available: {sorted(plans.get('configurations', {}))}). Use -c 3d_fullres.")
    mismatches = architecture_mismatches(plans, configuration, foundation.plans, foundation.configuration)
    if mismatches:
        raise MedSeqFTError(f"{plans_file} ({configuration}) differs from the foundation's plans in {mismatches}: "
                            f"its weights would not transfer. Re-plan with {_replan_hint(name, foundation.path)}")
    cfg = _configuration(plans, configuration)
    data_folder = os.path.join(dataset_folder, cfg["data_identifier"])
    if not os.path.isdir(data_folder) or not os.listdir(data_folder):
        raise MedSeqFTError(f"Preprocessed data folder {data_folder} is missing or empty. "
                            f"Run: {_replan_hint(name, foundation.path)} (it preprocesses too).")
    if settings is None:
        settings = MDSSettings.from_dict(section.get("mds") or {})
    cases = training_cases(dataset_folder, data_folder, fold, log)
    k = settings.buffer_size(len(cases))
    key = {
        "dataset": name, "plans": plans_name, "configuration": configuration, "fold": fold,
        "foundation_sha256": foundation.sha256, "ssl": foundation.ssl.to_dict(), "settings": settings.to_dict(),
        "patch_size": [int(p) for p in cfg["patch_size"]], "data_identifier": cfg["data_identifier"],
        "training_cases": cases,
    }
    return MDSInputs(name, dataset_folder, data_folder, plans, plans_name, configuration, fold, foundation,
                     settings, cases, k, json.loads(json.dumps(key)))


def _configuration(plans: dict, configuration: str) -> dict:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    return PlansManager(copy.deepcopy(plans)).get_configuration(configuration).configuration


# ---------------------------------------------------------------- scoring

class SSLScorer:
    """The foundation's SSL loss, computed by ``ssl.ssl_losses`` exactly as in pre-training."""

    def __init__(self, foundation: Foundation, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.network = foundation.build_ssl_network(self.device)
        self.ssl_settings = foundation.ssl

    def losses(self, patches: np.ndarray, generator: torch.Generator) -> np.ndarray:
        x = torch.from_numpy(patches).to(self.device)
        with torch.inference_mode():
            per_sample, _ = ssl_losses(self.network, x, self.ssl_settings, generator)
        return per_sample.float().cpu().numpy()


@dataclass
class CaseStream:
    """One case's random streams and its losses so far."""

    key: str
    rng: np.random.Generator  # patch positions
    generator: torch.Generator  # masks (CPU generator: the same masks on every device)
    losses: list[float] = field(default_factory=list)

    @classmethod
    def create(cls, seed: int, key: str) -> "CaseStream":
        key_int = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
        patch_seq, mask_seq = np.random.SeedSequence([seed, key_int]).spawn(2)
        gen = torch.Generator().manual_seed(int(mask_seq.generate_state(1, np.uint64)[0]))
        return cls(key, np.random.default_rng(patch_seq), gen)

    @property
    def n(self) -> int:
        return len(self.losses)

    def stats(self) -> tuple[float, float]:
        x = np.asarray(self.losses, dtype=np.float64)
        se = float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else float("inf")
        return float(x.mean()), se


def bonferroni_z(confidence: float, n_cases: int) -> float:
    """Two-sided normal quantile with the error budget 1 - confidence split over the n cases."""
    return NormalDist().inv_cdf(1.0 - (1.0 - confidence) / (2.0 * max(1, n_cases)))


class _Engine:
    def __init__(self, scorer: SSLScorer, dataset, patch_size, draws_per_batch: int, bar):
        self.scorer, self.dataset, self.patch = scorer, dataset, tuple(int(p) for p in patch_size)
        self.dpb, self.bar = draws_per_batch, bar
        self.forward_passes = 0

    def draw(self, case: CaseStream, target: int) -> None:
        """Draw batches for one case until it has ``target`` draws (the case is loaded once per visit)."""
        data = self.dataset.load_case(case.key)[0]
        if any(s < p for s, p in zip(data.shape[1:], self.patch)):
            data = np.asarray(data[:])  # padding needed: decompress once, not once per draw
        while case.n < target:
            n = min(self.dpb, target - case.n)
            patches = np.stack([random_patch(data, self.patch, case.rng) for _ in range(n)])
            case.losses.extend(float(v) for v in self.scorer.losses(patches, case.generator))
            self.forward_passes += 1
            self.bar.update(n)


def _boundary(means: np.ndarray, k: int) -> float | None:
    if k >= means.size:
        return None  # every case is in the buffer: nothing to separate
    srt = np.sort(means)
    return float((srt[k - 1] + srt[k]) / 2.0)


def score(inputs: MDSInputs, device: str | torch.device = "cpu", progress: bool = True,
          scorer: SSLScorer | None = None) -> dict:
    """Score the fold's training cases (fixed or adaptive repeats) and return the buffer record.

    ``scorer``: an SSLScorer of ``inputs.foundation`` to reuse (default: built here, on ``device``)."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from tqdm import tqdm

    s, k, n = inputs.settings, inputs.k, len(inputs.cases)
    t0 = time.perf_counter()
    dataset = infer_dataset_class(inputs.data_folder)(inputs.data_folder, identifiers=list(inputs.cases))
    cases = [CaseStream.create(s.seed, key) for key in inputs.cases]
    adaptive = s.repeats is None
    cap = s.max_repeats if adaptive else s.repeats
    first = min(cap, -(-s.min_repeats // s.draws_per_batch) * s.draws_per_batch) if adaptive else cap
    z = bonferroni_z(s.confidence, n)
    with tqdm(total=n * cap, unit="draw", desc="MDS scoring", disable=not progress, dynamic_ncols=True) as bar:
        engine = _Engine(scorer or SSLScorer(inputs.foundation, device), dataset, inputs.key["patch_size"],
                         s.draws_per_batch, bar)
        for i, case in enumerate(cases):
            engine.draw(case, first)
            bar.set_postfix_str(f"cases {i + 1}/{n}")
        while adaptive:
            open_cases, _ = _unsettled(cases, k, z, s.tolerance)
            open_cases = [c for c in open_cases if c.n < cap]
            bar.total = bar.n + sum(cap - c.n for c in open_cases)  # upper bound: ETA shrinks as cases settle
            bar.set_postfix_str(f"settled {n - len(open_cases)}/{n}")
            if not open_cases:
                break
            for case in open_cases:
                engine.draw(case, min(cap, case.n + s.draws_per_batch))
    unsettled, boundary = _unsettled(cases, k, z, s.tolerance)
    means = np.array([c.stats()[0] for c in cases])
    order = sorted(range(n), key=lambda i: (means[i], cases[i].key))
    rank = {cases[i].key: r for r, i in enumerate(order)}
    unsettled_keys = {c.key for c in unsettled}
    per_case = {}
    for c in cases:
        mean, se = c.stats()
        per_case[c.key] = {"mean": mean, "se": se if np.isfinite(se) else None, "draws": c.n,
                           "rank": rank[c.key], "selected": rank[c.key] < k, "settled": c.key not in unsettled_keys}
    return json.loads(json.dumps({
        "format": FORMAT,
        "key": inputs.key,
        "k": k,
        "buffer": [cases[i].key for i in order[:k]],
        "mode": "adaptive" if adaptive else "fixed",
        "boundary": boundary,
        "z": z,  # fixed mode too: 'settled' then says whether R draws settled the top-K
        "all_settled": not unsettled,
        "draws": int(sum(c.n for c in cases)),
        "forward_passes": engine.forward_passes,
        "wall_time_s": round(time.perf_counter() - t0, 3),
        "device": str(engine.scorer.device),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "foundation": inputs.foundation.provenance(),
        "cases": per_case,
    }))


def _unsettled(cases: list[CaseStream], k: int, z: float, tolerance: float = 0.0
               ) -> tuple[list[CaseStream], float | None]:
    """Cases whose interval mean +- z*se straddles the boundary b and is wider than the indifference
    zone tolerance * |b| (all settled when k = n)."""
    stats = [c.stats() for c in cases]
    b = _boundary(np.array([m for m, _ in stats]), k)
    if b is None:
        return [], None
    zone = tolerance * abs(b)
    return [c for c, (m, se) in zip(cases, stats) if abs(m - b) <= z * se and z * se > zone], b


# ---------------------------------------------------------------- buffer file

def _read_record(path: str) -> dict | None:
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("format") == FORMAT else None


def _key_differences(stored: dict, expected: dict) -> list[str]:
    stored = stored or {}
    return sorted(f for f in set(stored) | set(expected) if stored.get(f) != expected.get(f))


def load_buffer(dataset_name_or_id, fold, plans_name: str = "MedSeqFTPlans", configuration: str = "3d_fullres",
                foundation_path: str | None = None, settings: MDSSettings | None = None) -> dict:
    """The stored buffer record; MedSeqFTError if it is missing or was made with other inputs."""
    inputs = prepare(dataset_name_or_id, fold, plans_name, configuration, foundation_path, settings,
                     log=lambda *_: None)
    path = buffer_file_path(inputs.dataset_name, inputs.fold, plans_name, configuration)
    fix = f"Run: medseqft select -d {inputs.dataset_name} -f {inputs.fold} -p {plans_name} -c {configuration}"
    record = _read_record(path) if os.path.isfile(path) else None
    if record is None:
        raise MedSeqFTError(f"No valid MDS buffer {path}. {fix}")
    diff = _key_differences(record.get("key"), inputs.key)
    if diff:
        raise MedSeqFTError(f"MDS buffer {path} is stale: it differs from the current inputs in {diff}. {fix} --force")
    return record


def select_buffer(dataset_name_or_id, fold, plans_name: str = "MedSeqFTPlans", configuration: str = "3d_fullres",
                  foundation_path: str | None = None, settings: MDSSettings | None = None,
                  device: str | torch.device = "cpu", progress: bool = True, force: bool = False,
                  log: Callable[[str], None] | None = print) -> dict:
    """Score the fold's training cases and write the buffer file; reuse a stored one made with the same inputs.

    foundation_path / settings default to the plans' ``medseqft`` section. ``log`` gets status lines
    (trainers can pass ``self.print_to_log_file``); ``progress`` shows a progress bar and the summary table.
    """
    log = log or (lambda *_: None)
    inputs = prepare(dataset_name_or_id, fold, plans_name, configuration, foundation_path, settings, log)
    path = buffer_file_path(inputs.dataset_name, inputs.fold, plans_name, configuration)
    if os.path.exists(path):
        stored = _read_record(path)
        diff = None if stored is None else _key_differences(stored.get("key"), inputs.key)
        if stored is not None and not diff and not force:
            log(f"MDS: reusing buffer {path} (same foundation, settings and training cases): {stored['buffer']}")
            return stored
        reason = "--force" if force and not diff else \
            "unreadable" if stored is None else f"made with other inputs ({', '.join(diff)})"
        log(f"MDS: recomputing buffer {path}: stored file is {reason}.")
    mode = f"fixed, {inputs.settings.repeats} draws" if inputs.settings.repeats else \
        f"adaptive, {inputs.settings.min_repeats}..{inputs.settings.max_repeats} draws"
    log(f"MDS: scoring {len(inputs.cases)} training cases of {inputs.dataset_name} fold {inputs.fold} "
        f"({mode}) for a buffer of K={inputs.k}")
    record = score(inputs, device, progress)
    write_json_atomic(record, path)
    if progress:
        log(summary_table(record, case_sites(inputs.dataset_name)))
    log(f"MDS: buffer {record['buffer']}: {record['draws']} draws in {record['forward_passes']} forward passes, "
        f"{record['wall_time_s']:.1f} s -> {path}")
    return record


# ---------------------------------------------------------------- reporting

def case_sites(dataset_name_or_id) -> dict[str, str]:
    """{case: site} from the ``sites.json`` sidecar next to the raw dataset.json, if there is one."""
    raw = os.environ.get("nnUNet_raw")
    if not raw:
        return {}
    path = os.path.join(raw, dataset_name(dataset_name_or_id), "sites.json")
    try:
        with open(path) as f:
            return dict(json.load(f).get("cases", {}))
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}


def summary_table(record: dict, sites: dict[str, str] | None = None) -> str:
    """One row per case, best (lowest loss) first; '*' marks the buffer."""
    sites = sites or {}
    rows = sorted(record["cases"].items(), key=lambda kv: kv[1]["rank"])
    width = max(len("case"), *(len(c) for c, _ in rows))
    lines = [f"{'case':<{width}}  {'site':<8}  {'mean SSL loss':>20}  {'draws':>6}  buffer"]
    for case, r in rows:
        se = f"{r['se']:.5f}" if r["se"] is not None else "n/a"
        lines.append(f"{case:<{width}}  {sites.get(case, '-'):<8}  {r['mean']:>9.5f} ± {se:<8}  "
                     f"{r['draws']:>6}  {'*' if r['selected'] else ''}")
    return "\n".join(lines)
