"""MDS (Maximum Data Similarity): choose the buffer B_t of the training cases that look most like pre-training data.

Every training case of the fold (never a validation case) is scored with the foundation M0's own SSL
loss: a random patch (plans patch size) and a random block mask (the foundation's SSL settings),
masked reconstruction MSE, computed by ``ssl.ssl_losses``, the function pre-training optimises. The score of a
case is its mean loss over many such draws; the buffer is the K cases with the lowest means.

Common draws. Draw j is the same for every case: the same block mask and the same relative patch position
(``ssl.patch_at``: the same place in every case, whatever its size), generated from (seed, j) alone
(``CommonDraws``). Each case's mean is still an unbiased estimate of its expected loss (positions stay
uniform over the valid starts), but the losses of two cases on one draw move together (where the patch
lies and what is hidden matter more than which case it is), so their difference is far less noisy than
either loss: at the CPU scale the variance of the paired difference of neighbouring cases is 0.28x (liver)
and 0.25x (spleen) that of independent draws (``bench_mds.py``: ``paired_variance_ratio``). The selection
only needs those differences.

Fixed mode (``repeats=R``): R draws for every case (the paper: about 1000).

Adaptive mode (``repeats=None``, the default). Draws come in batches of ``draws_per_batch`` (one case
per forward). Every case first gets ``min_repeats`` draws; then, after each round:

  * the current buffer = the K lowest means; b = midpoint of the K-th and (K+1)-th means (for the zone);
  * for every pair (i in the buffer, o outside it), on their common draws 1..min(n_i, n_o):
    d = loss_i - loss_o, with mean and standard error se (sample std / sqrt(n));
  * z = Phi^-1(1 - alpha / (2 P)), alpha = 1 - confidence, P = K (n - K) pairs (Bonferroni over pairs);
  * the pair is *settled* when mean(d) + z se < 0 (i is better), or when it is a near-tie within the
    indifference zone tolerance * |b| (``MDSSettings.tolerance``), by the setting ``rule``:
      "epsilon": mean(d) + z se <= zone: i is at most the zone worse than o;
      "zone":    mean(d) + z se <= zone and z se <= zone: the difference is also known to within the zone.
    (Where the common draws are fewer than i's own because o stopped early and they contradict the current
    ranking, mean(d) + z se is large and the pair stays open.)
In each open pair the case with fewer draws (both when equal) gets another batch: draws beyond the
pair's common draws do not inform it. Scoring stops when every pair is settled or its cases have
``max_repeats`` draws. Pairs are re-formed every round, because the buffer can change.

Guarantee (approximate). If every pair's interval covers its true mean difference (probability >=
confidence by the union bound over the P pairs, with the CLT's normal approximation for each mean
difference), then when scoring stops with every pair settled, no selected case's expected loss lies more than
tolerance * |b| above an unselected case's (an epsilon-top-K set; both rules), and pairs settled by their sign
are ordered exactly. It is approximate because (1) the normal approximation is poor for small
``min_repeats``, (2) looking after every round (optional stopping) inflates the error somewhat, which the
Bonferroni factor only partly absorbs, (3) b is itself estimated. The benchmarks measure the agreement with
fixed R = 1000: ``bench_mds.py`` (one scoring), ``bench_mds_rule.py`` (rules replayed on R = 1000 losses of
every case of the benchmark tasks, over many draw orders; ``replay`` runs the rule on such losses).

Determinism: draw j depends only on (seed, j), so a case's scores do not depend on the other cases, the
fold or the order of scoring; the first n draws of adaptive mode are exactly the first n draws of fixed
mode.

The inputs and the buffer file (reuse by key) live in ``buffer.py``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import TYPE_CHECKING

import numpy as np
import torch

from nnunetv2_medseqft.method.foundation import Foundation
from nnunetv2_medseqft.method.ssl import coarse_block_mask, expand_blocks, patch_at, ssl_losses

if TYPE_CHECKING:
    from nnunetv2_medseqft.method.buffer import MDSInputs

FORMAT = "medseqft-mds-buffer/2"  # /2: common draws (/1 files are rescored)


# ---------------------------------------------------------------- scoring

class SSLScorer:
    """The foundation's SSL loss, computed by ``ssl.ssl_losses`` exactly as in pre-training."""

    def __init__(self, foundation: Foundation, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.network = foundation.build_ssl_network(self.device)
        self.ssl_settings = foundation.ssl

    def losses(self, patches: np.ndarray, masks: torch.Tensor) -> np.ndarray:
        x = torch.from_numpy(patches).to(self.device)
        with torch.inference_mode():
            per_sample, _ = ssl_losses(self.network, x, self.ssl_settings, mask=masks)
        return per_sample.float().cpu().numpy()


class CommonDraws:
    """The draws every case shares: draw j is a relative patch position (``ssl.patch_at``) and a block mask,
    generated from (seed, j // CHUNK) alone, so draw j is the same whatever the case, the batching or the order.
    Masks are kept on the block grid (a few hundred numbers each), so a thousand draws cost little memory."""

    CHUNK = 64

    def __init__(self, seed: int, patch_size, ssl_settings):
        self.seed, self.patch, self.ssl = int(seed), tuple(int(p) for p in patch_size), ssl_settings
        self._chunks: dict[int, tuple[np.ndarray, torch.Tensor]] = {}

    def _chunk(self, c: int) -> tuple[np.ndarray, torch.Tensor]:
        if c not in self._chunks:
            pos_seq, mask_seq = np.random.SeedSequence([self.seed, c]).spawn(2)
            positions = np.random.default_rng(pos_seq).random((self.CHUNK, len(self.patch)))
            gen = torch.Generator().manual_seed(int(mask_seq.generate_state(1, np.uint64)[0]))
            self._chunks[c] = positions, coarse_block_mask(self.CHUNK, self.patch, self.ssl, gen)
        return self._chunks[c]

    def get(self, start: int, stop: int) -> tuple[np.ndarray, torch.Tensor]:
        """Positions (n, ndim) and coarse masks (n, 1, *grid) of draws start..stop-1."""
        idx = np.arange(start, stop)
        parts = [self._chunk(int(c)) for c in np.unique(idx // self.CHUNK)]
        positions = np.concatenate([p for p, _ in parts])
        masks = torch.cat([m for _, m in parts])
        offset = (start // self.CHUNK) * self.CHUNK
        return positions[idx - offset], masks[torch.from_numpy(idx - offset)]


@dataclass
class CaseScores:
    """One case's losses, draw j at index j."""

    key: str
    losses: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.losses)

    def stats(self) -> tuple[float, float]:
        x = np.asarray(self.losses, dtype=np.float64)
        se = float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else float("inf")
        return float(x.mean()), se


def bonferroni_z(confidence: float, n_tests: int) -> float:
    """Two-sided normal quantile with the error budget 1 - confidence split over n tests."""
    return NormalDist().inv_cdf(1.0 - (1.0 - confidence) / (2.0 * max(1, n_tests)))


class _Engine:
    def __init__(self, scorer: SSLScorer, dataset, patch_size, draws_per_batch: int, draws: CommonDraws, bar):
        self.scorer, self.dataset, self.patch = scorer, dataset, tuple(int(p) for p in patch_size)
        self.dpb, self.draws, self.bar = draws_per_batch, draws, bar
        self.forward_passes = 0

    def draw(self, case: CaseScores, target: int) -> None:
        """Draw batches for one case until it has ``target`` draws (the case is loaded once per visit)."""
        data = self.dataset.load_case(case.key)[0]
        if any(s < p for s, p in zip(data.shape[1:], self.patch)):
            data = np.asarray(data[:])  # padding needed: decompress once, not once per draw
        while case.n < target:
            n = min(self.dpb, target - case.n)
            positions, coarse = self.draws.get(case.n, case.n + n)
            patches = np.stack([patch_at(data, self.patch, u) for u in positions])
            masks = expand_blocks(coarse, self.patch, self.scorer.ssl_settings, self.scorer.device)
            case.losses.extend(float(v) for v in self.scorer.losses(patches, masks))
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


def _draw_limits(s) -> tuple[int, int]:
    """(draws per case at most, draws every case gets first)."""
    if s.repeats is not None:
        return s.repeats, s.repeats
    return s.max_repeats, min(s.max_repeats, -(-s.min_repeats // s.draws_per_batch) * s.draws_per_batch)


def draw_cases(cases: list[CaseScores], k: int, s, draw, on_round=lambda open_cases: None) -> float:
    """The schedule of draws (fixed or adaptive, ``s``: MDSSettings), whatever produces them: ``draw(case, target)``
    extends ``case.losses`` to ``target`` draws (draw j of every case is common draw j). ``on_round`` gets the
    cases an adaptive round draws for (empty at the end). Returns z, the pairs' Bonferroni quantile."""
    cap, first = _draw_limits(s)
    z = bonferroni_z(s.confidence, k * (len(cases) - k))  # one test per (buffer, non-buffer) pair
    for case in cases:
        draw(case, first)
    while s.repeats is None:
        behind = _behind(_open_pairs(cases, k, z, s.tolerance, s.rule)[0])
        open_cases = [c for c in cases if id(c) in behind and c.n < cap]
        on_round(open_cases)
        if not open_cases:
            break
        for case in open_cases:
            draw(case, min(cap, case.n + s.draws_per_batch))
    return z


def _outcome(cases: list[CaseScores], k: int, z: float, s) -> tuple[list[int], set[str], float | None]:
    """(case indices best first, keys of unsettled cases, boundary b)."""
    unsettled, boundary = _unsettled(cases, k, z, s.tolerance, s.rule)
    means = np.array([c.stats()[0] for c in cases])
    order = sorted(range(len(cases)), key=lambda i: (means[i], cases[i].key))
    return order, {c.key for c in unsettled}, boundary


def replay(losses: dict[str, np.ndarray], k: int, s) -> dict:
    """The selection ``score`` makes, on losses drawn beforehand (``losses[key][j]``: the case's loss on common
    draw j, e.g. from a fixed-R scoring): the buffer, the draws it used and whether every pair settled. Lets
    ``benchmarks/bench_mds_rule.py`` compare rules without a forward pass."""
    cases = [CaseScores(key) for key in losses]

    def draw(case: CaseScores, target: int) -> None:
        if target > len(losses[case.key]):
            raise ValueError(f"{case.key}: {len(losses[case.key])} draws given, the rule asks for {target}")
        case.losses.extend(float(v) for v in losses[case.key][case.n:target])

    z = draw_cases(cases, k, s, draw)
    order, unsettled_keys, _ = _outcome(cases, k, z, s)
    return {"buffer": [cases[i].key for i in order[:k]], "draws": int(sum(c.n for c in cases)),
            "all_settled": not unsettled_keys}


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
    cases = [CaseScores(key) for key in inputs.cases]
    cap = _draw_limits(s)[0]
    with tqdm(total=n * cap, unit="draw", desc="MDS scoring", disable=not progress, dynamic_ncols=True) as bar:
        engine = _Engine(scorer or SSLScorer(inputs.foundation, device), dataset, inputs.key["patch_size"],
                         s.draws_per_batch, CommonDraws(s.seed, inputs.key["patch_size"], inputs.foundation.ssl), bar)
        status, open_now = _StatusLines(report), []

        def on_round(open_cases: list[CaseScores]) -> None:
            open_now[:] = open_cases or [None]  # [None]: the first draws are over
            bar.total = bar.n + sum(cap - c.n for c in open_cases)  # upper bound: ETA shrinks as cases settle
            bar.set_postfix_str(f"settled {n - len(open_cases)}/{n}")

        def draw(case: CaseScores, target: int) -> None:
            engine.draw(case, target)
            done = sum(c.n for c in cases)
            if open_now:
                rest = [c for c in open_now if c is not None]
                status(done, done + sum(cap - c.n for c in rest), f"{n - len(rest)}/{n} cases settled")
            else:
                started = sum(c.n > 0 for c in cases)
                bar.set_postfix_str(f"cases {started}/{n}")
                status(done, n * cap, f"first draws of {started}/{n} cases")

        z = draw_cases(cases, k, s, draw, on_round)
    order, unsettled_keys, boundary = _outcome(cases, k, z, s)
    rank = {cases[i].key: r for r, i in enumerate(order)}
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
        "mode": "adaptive" if s.repeats is None else "fixed",
        "boundary": boundary,
        "z": z,  # fixed mode too: 'settled' then says whether R draws settled the top-K
        "all_settled": not unsettled_keys,
        "draws": int(sum(c.n for c in cases)),
        "forward_passes": engine.forward_passes,
        "wall_time_s": round(time.perf_counter() - t0, 3),
        "device": str(engine.scorer.device),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "foundation": inputs.foundation.provenance(),
        "cases": per_case,
    }))


def _open_pairs(cases: list[CaseScores], k: int, z: float, tolerance: float = 0.0, rule: str = "zone"
                ) -> tuple[list[tuple[CaseScores, CaseScores]], float | None]:
    """The unsettled pairs and the boundary b. For every pair (i in the current top K, o outside it), on their
    common draws 1..min(n_i, n_o): d = loss_i - loss_o, upper = mean(d) + z se(d); settled when upper < 0 (i is
    better, at the pair's confidence) or, within the indifference zone tolerance * |b|:
      rule "epsilon": upper <= zone (i is at most the zone worse than o);
      rule "zone": z se(d) <= zone and upper <= zone (the difference known to within the zone, both ways).
    No pairs when k = n."""
    stats = [c.stats() for c in cases]
    means = np.array([m for m, _ in stats])
    b = _boundary(means, k)
    if b is None:
        return [], None
    order = sorted(range(len(cases)), key=lambda i: (means[i], cases[i].key))
    zone = tolerance * abs(b)
    pairs = []
    for i in order[:k]:
        for o in order[k:]:
            m = min(cases[i].n, cases[o].n)
            d = np.asarray(cases[i].losses[:m], dtype=np.float64) - np.asarray(cases[o].losses[:m], dtype=np.float64)
            se = float(d.std(ddof=1) / np.sqrt(m)) if m > 1 else float("inf")
            upper = float(d.mean()) + z * se
            near_tie = upper <= zone and (rule == "epsilon" or z * se <= zone)
            if not (upper < 0 or near_tie):
                pairs.append((cases[i], cases[o]))
    return pairs, b


def _unsettled(cases: list[CaseScores], k: int, z: float, tolerance: float = 0.0, rule: str = "zone"
               ) -> tuple[list[CaseScores], float | None]:
    """Cases in an unsettled pair (``_open_pairs``), in their given order, and the boundary b."""
    pairs, b = _open_pairs(cases, k, z, tolerance, rule)
    members = {id(c) for pair in pairs for c in pair}
    return [c for c in cases if id(c) in members], b


def _behind(pairs: list[tuple[CaseScores, CaseScores]]) -> set[int]:
    """ids of the cases an open pair waits for: the one with fewer draws (both when equal); more draws of the other
    would lie beyond the pair's common draws."""
    return {id(c) for i, o in pairs for c in (i, o) if c.n == min(i.n, o.n)}


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
