"""The scoring steps of a run: Dice/HD95 of every task model on its fold's validation cases, the R matrix
(ACC, BWT, FWT), the unseen-task transfer and the multitask reference, written to ``results.json``."""

from __future__ import annotations

import os

from nnunetv2_medseqft.checkpoints import with_decoder, with_head
from nnunetv2_medseqft.evaluation.metrics import continual_metrics, encoder_bwt
from nnunetv2_medseqft.evaluation.validation import ValidationSet, load_weights, training_curves
from nnunetv2_medseqft.jsonio import read_json, write_json_atomic
from nnunetv2_medseqft.paths import portable, raw_dataset_json
from nnunetv2_medseqft.reports.overlays import overlay_file
from nnunetv2_medseqft.sequence.layout import RESULTS_FILE
from nnunetv2_medseqft.sequence.union_dataset import label_map_for

RESULTS_FORMAT = "medseqft-run-results/1"


def _pts(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


class ScoringSteps:
    """Runner steps that score models (mixed into ``Runner``; they train nothing)."""

    def _results(self) -> dict:
        path = os.path.join(self.results_folder, RESULTS_FILE)
        if os.path.isfile(path):
            return read_json(path)
        r = self.request
        return {"format": RESULTS_FORMAT, "run": r.name, "method": r.method, "seed": r.seed, "fold": r.fold,
                "tasks": list(r.datasets), "unseen": list(r.unseen), "scores": {}, "R": None, "summary": {},
                "unseen_scores": {}, "curves": {}}

    def _save_results(self, results: dict) -> dict:
        path = os.path.join(self.results_folder, RESULTS_FILE)
        write_json_atomic(results, path)
        return {"results": {"path": portable(path)}}  # appended to by later steps: no size

    def _validation(self, dataset: str, plans: str | None = None, model_dataset_json: dict | None = None):

        plans = plans or self._plans_name(self._is_m0_reference(dataset))  # the plans its model was trained with
        return ValidationSet.load(dataset, plans, self.request.configuration,
                                  self.request.fold, device=self.request.device, mirror=self.request.mirror,
                                  model_dataset_json=model_dataset_json)

    def _evaluate_task(self, dataset: str) -> dict:

        val = self._validation(dataset)
        scores = {"M": val.score(load_weights(self._task_model(dataset)),
                                 overlay=overlay_file(self.results_folder, dataset))}
        if self.method.has_fft and os.path.isfile(self._task_model(dataset, "F")):
            scores["F"] = val.score(load_weights(self._task_model(dataset, "F")))
        results = self._results()
        results["scores"][dataset] = scores
        results["curves"][dataset] = training_curves(self._task_model(dataset))
        self.log(f"  {dataset}: Dice M_t {_pts(scores['M']['mean']['dice'])}"
                 + (f", F_t {_pts(scores['F']['mean']['dice'])}" if "F" in scores else "")
                 + f" (HD95 M_t {_pts(scores['M']['mean']['hd95'])} mm)")
        return self._save_results(results)

    def _evaluate_r(self) -> dict:

        tasks = self.request.datasets
        bodies = [self.foundation.checkpoint["network_weights"]] + [load_weights(self._task_model(d)) for d in tasks]
        dice = [[None] * len(tasks) for _ in bodies]
        hd95 = [[None] * len(tasks) for _ in bodies]
        encoder = [[None] * len(tasks) for _ in bodies]
        results = self._results()
        for j, d in enumerate(tasks):
            val = self._validation(d)
            head = bodies[j + 1]
            own = (results["scores"].get(d) or {}).get("M", {}).get("mean")  # R[j+1][j]: scored by evaluate/<d>
            for i, body in enumerate(bodies):
                s = own if i == j + 1 and own else val.score(with_head(body, head))["mean"]
                dice[i][j], hd95[i][j] = s["dice"], s["hd95"]
            # forgetting in the encoder alone: a later body's encoder under task j's own decoder and head (the
            # decoder of a chain is re-trained by every task, so with task j's head alone R shows little but that)
            encoder[j + 1][j] = dice[j + 1][j]
            for i in range(j + 2, len(bodies)):
                encoder[i][j] = val.score(with_decoder(bodies[i], bodies[j + 1]))["mean"]["dice"]
        results["R"] = {"rows": ["M0"] + list(tasks), "cols": list(tasks), "dice": dice, "hd95": hd95,
                        "dice_encoder": encoder}
        results["summary"] = {**continual_metrics(dice), "bwt_encoder": encoder_bwt(dice, encoder),
                              **self._mean_scores(results)}
        self.log("  " + ", ".join(f"{k.upper()} {v:.1f}" for k, v in results["summary"].items() if v is not None))
        return self._save_results(results)

    def _mean_scores(self, results: dict) -> dict:
        m = [results["scores"][d]["M"]["mean"] for d in self.request.datasets if d in results["scores"]]
        return {f"mean_{k}": _mean([s[k] for s in m]) for k in ("dice", "hd95")}

    def _evaluate_unseen(self, dataset: str) -> dict:

        val = self._validation(dataset)
        from_run = val.score(load_weights(os.path.join(self._model_folder(dataset), "checkpoint_final.pth")))
        from_m0 = val.score(load_weights(os.path.join(self._model_folder(dataset, True), "checkpoint_final.pth")))
        results = self._results()
        results["unseen_scores"][dataset] = {"from_run": from_run, "from_m0": from_m0}
        self.log(f"  unseen {dataset}: Dice from the final body {_pts(from_run['mean']['dice'])}, "
                 f"from M0 {_pts(from_m0['mean']['dice'])}")
        return self._save_results(results)

    def _evaluate_union(self) -> dict:

        union = self._union_name()
        union_json = raw_dataset_json(union)
        weights = load_weights(self._task_model(union))
        results = self._results()
        for d in self.request.datasets:
            val = self._validation(d, plans=self.base_plans, model_dataset_json=union_json)
            results["scores"][d] = {"M": val.score(weights, label_map_for(union_json, d))}
            self.log(f"  {d}: Dice of the multitask model {_pts(results['scores'][d]['M']['mean']['dice'])}")
        results["curves"][union] = training_curves(self._task_model(union))
        dice = [results["scores"][d]["M"]["mean"]["dice"] for d in self.request.datasets]
        results["summary"] = {"acc": _mean(dice), "bwt": None, "fwt": None, "bwt_encoder": None,
                              **self._mean_scores(results)}
        return self._save_results(results)
