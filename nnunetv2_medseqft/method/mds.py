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

The inputs and the buffer file (reuse by key) live in ``buffer.py``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import TYPE_CHECKING

import numpy as np
import torch

from nnunetv2_medseqft.method.foundation import Foundation
from nnunetv2_medseqft.method.ssl import random_patch, ssl_losses

if TYPE_CHECKING:
    from nnunetv2_medseqft.method.buffer import MDSInputs

FORMAT = "medseqft-mds-buffer/1"


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


class _StatusLines:
    """Progress as a line every ``every`` seconds (for logs and ``medseqft run``'s console, where a bar is not)."""

    def __init__(self, report, every: float = 15.0):
        self.report, self.every = report, every
        self.start = self.last = time.perf_counter()

    def __call__(self, done: int, most: int, state: str) -> None:
        """``done`` draws so far, ``most`` an upper bound of the draws this scoring needs."""
        now = time.perf_counter()
        if self.report is None or now - self.last < self.every:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        self.report(f"MDS: {state}, {done} draws, {rate:.1f} draws/s, ETA <= {(most - done) / rate / 60:.1f} min")


def score(inputs: MDSInputs, device: str | torch.device = "cpu", progress: bool = True,
          scorer: SSLScorer | None = None, report=None) -> dict:
    """Score the fold's training cases (fixed or adaptive repeats) and return the buffer record.

    ``scorer``: an SSLScorer of ``inputs.foundation`` to reuse (default: built here, on ``device``).
    ``report``: gets a status line (cases settled, draws, ETA) every 15 s, for output without a progress bar."""
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
        status = _StatusLines(report)
        for i, case in enumerate(cases):
            engine.draw(case, first)
            bar.set_postfix_str(f"cases {i + 1}/{n}")
            status(sum(c.n for c in cases), n * cap, f"first draws of {i + 1}/{n} cases")
        while adaptive:
            open_cases, _ = _unsettled(cases, k, z, s.tolerance)
            open_cases = [c for c in open_cases if c.n < cap]
            bar.total = bar.n + sum(cap - c.n for c in open_cases)  # upper bound: ETA shrinks as cases settle
            bar.set_postfix_str(f"settled {n - len(open_cases)}/{n}")
            if not open_cases:
                break
            for case in open_cases:
                engine.draw(case, min(cap, case.n + s.draws_per_batch))
                done = sum(c.n for c in cases)
                status(done, done + sum(cap - c.n for c in open_cases), f"{n - len(open_cases)}/{n} cases settled")
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


# ---------------------------------------------------------------- reporting

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
