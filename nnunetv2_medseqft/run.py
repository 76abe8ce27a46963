"""``medseqft run``: feed nnU-Net datasets through a method one task at a time, resumably.

Steps of a run, in order (each recorded in the manifest, see ``manifest.py``):
  plan          foundation-compatible plans + preprocessing of every dataset (shared by all runs of one
                foundation: plans ``MedSeqFTPlans-<foundation sha[:8]>``; skipped when already done)
  union         multitask only: one raw dataset with every task's training and validation cases
  select/D      MDS buffer (methods with MDS)
  train/D       ``nnUNetv2_train`` with the method's trainer, from M_(t-1) (or M0), plans
                ``MedSeqFTPlans_<run>`` holding the run's settings (so every run has its own results folders)
  evaluate/D    Dice/HD95 of M_t (and F_t) on the fold's validation cases
  evaluate/R    the R matrix, ACC, BWT, FWT
  unseen/U/...  full fine-tuning of the run's final body and of M0 (plans ``MedSeqFTPlans_<run>.fromM0``)
                on each unseen dataset, then both evaluated
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shlex
from dataclasses import dataclass, field

from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.jsonio import read_json, write_json_atomic
from nnunetv2_medseqft.manifest import Manifest, RunLock, file_record
from nnunetv2_medseqft.methods import METHODS, UNSEEN_TRAINER, Method, get_method
from nnunetv2_medseqft.run_layout import LOGS_FOLDER, RESULTS_FILE, check_run_name, run_folder
from nnunetv2_medseqft.train_process import output_to, train_with_progress

RESULTS_FORMAT = "medseqft-run-results/1"
FROM_M0 = ".fromM0"  # run names cannot hold '.', so these plans names never collide with a run's


# ---------------------------------------------------------------- settings and names

def base_plans_name(foundation_sha: str) -> str:
    return f"MedSeqFTPlans-{foundation_sha[:8]}"


def run_plans_name(run: str) -> str:
    return f"MedSeqFTPlans_{run}"


def reference_plans_name(base_plans: str, settings: dict) -> str:
    """Plans of the unseen-task reference (full fine-tuning of M0): shared by every run whose foundation,
    budget, seed, fold and configuration agree, so it is trained once (under a lock) and reused."""
    keys = ("budget", "seed", "fold", "configuration", "nnunet_final_validation")
    digest = hashlib.sha256(json.dumps({k: settings[k] for k in keys}, sort_keys=True).encode()).hexdigest()
    return f"{base_plans}{FROM_M0}-{digest[:8]}"


def model_folder(dataset: str, trainer: str, plans: str, configuration: str, fold) -> str:
    from nnunetv2_medseqft.run_layout import results_root

    return os.path.join(results_root(), dataset, f"{trainer}__{plans}__{configuration}", f"fold_{fold}")


def raw_dataset(dataset_name_or_id) -> tuple[str, dict]:
    """Name and dataset.json of a dataset in $nnUNet_raw, with clear errors for what nnU-Net needs."""
    raw = os.environ.get("nnUNet_raw")
    if not raw:
        raise MedSeqFTError("$nnUNet_raw is not set: export it (the folder that holds DatasetXXX_Name/).")
    text = str(dataset_name_or_id)
    if text.isdigit():
        prefix = f"Dataset{int(text):03d}_"
        hits = sorted(d for d in os.listdir(raw) if d.startswith(prefix)) if os.path.isdir(raw) else []
    else:
        hits = [text] if os.path.isdir(os.path.join(raw, text)) else []
    if len(hits) != 1:
        known = sorted(d for d in os.listdir(raw) if d.startswith("Dataset")) if os.path.isdir(raw) else []
        raise MedSeqFTError(f"Dataset {text} is {'ambiguous' if hits else 'not'} in $nnUNet_raw ({raw}). "
                            f"Known: {', '.join(known) or 'none'}. Give an id or a DatasetXXX_Name folder there.")
    name = hits[0]
    folder = os.path.join(raw, name)
    json_file = os.path.join(folder, "dataset.json")
    missing = [p for p in ("dataset.json", "imagesTr", "labelsTr") if not os.path.exists(os.path.join(folder, p))]
    if missing:
        raise MedSeqFTError(f"{folder} is not an nnU-Net raw dataset: {', '.join(missing)} missing. See nnU-Net's "
                            "dataset_format.md (dataset.json, imagesTr/CASE_0000.ext, labelsTr/CASE.ext).")
    try:
        dataset_json = read_json(json_file)
    except ValueError as e:
        raise MedSeqFTError(f"{json_file} is not valid JSON ({e}).") from e
    keys = [k for k in ("labels", "file_ending", "numTraining") if k not in dataset_json]
    if keys or not (dataset_json.get("channel_names") or dataset_json.get("modality")):
        raise MedSeqFTError(f"{json_file} lacks {', '.join(keys or ['channel_names'])}: nnU-Net v2 needs "
                            "channel_names, labels, numTraining and file_ending.")
    return name, dataset_json


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

    def settings(self, foundation_sha: str) -> dict:
        return {"method": self.method, "datasets": list(self.datasets), "unseen": list(self.unseen),
                "fold": self.fold, "seed": self.seed, "configuration": self.configuration,
                "foundation_sha256": foundation_sha, "budget": dict(self.budget), "rft": dict(self.rft),
                "mds": dict(self.mds), "evaluation_mirroring": self.mirror,
                "nnunet_final_validation": self.nnunet_validation}


def validate(request: RunRequest):
    """Every check that needs no training, before anything is written. Returns the loaded foundation."""
    from nnunetv2_medseqft.foundation import load_foundation
    from nnunetv2_medseqft.mds import parse_fold
    from nnunetv2_medseqft.mds_settings import MDSSettings
    from nnunetv2_medseqft.planners.medseqft_planner import check_channels
    from nnunetv2_medseqft.rft_settings import RFTSettings
    from nnunetv2_medseqft.trainer_variants import BUDGET_KEYS

    check_run_name(request.name)
    method = get_method(request.method)
    request.fold = parse_fold(request.fold)
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
    RFTSettings.from_dict(request.rft)  # raises on bad values
    MDSSettings.from_dict(request.mds)
    return foundation


def _pts(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------- the runner

class Runner:
    def __init__(self, request: RunRequest, foundation, manifest: Manifest, log=print):
        self.request, self.foundation, self.manifest, self.log = request, foundation, manifest, log
        self.method: Method = get_method(request.method)
        self.folder = manifest.folder
        self.base_plans = base_plans_name(foundation.sha256)
        self.step_index = 0
        self.steps = self._plan_steps()

    # ------------------------------------------------------------ step list
    def _plan_steps(self) -> list[tuple[str, callable]]:
        r, m = self.request, self.method
        self.trainings = {}  # step -> (dataset, start model, from M0): what _check_model_folders inspects
        steps = [("plan", lambda: self._plan(r.datasets + r.unseen))]
        if m.union:
            steps += [("union", self._union), ("plan/union", lambda: self._plan([self._union_name()])),
                      ("train/union", lambda: self._train(self._union_name(), self.request.foundation)),
                      ("evaluate/union", self._evaluate_union)]
        else:
            for i, d in enumerate(r.datasets):
                if m.mds:
                    steps.append((f"select/{d}", lambda i=i, d=d: self._select(i, d)))
                self.trainings[f"train/{d}"] = (d, lambda i=i: self._start_model(i), False)
                steps.append((f"train/{d}", lambda i=i, d=d: self._train(d, self._start_model(i))))
                steps.append((f"evaluate/{d}", lambda d=d: self._evaluate_task(d)))
            steps.append(("evaluate/R", self._evaluate_r))
        for u in r.unseen:
            self.trainings[f"unseen/{u}/from-run"] = (u, self._final_model, False)
            self.trainings[f"unseen/{u}/from-M0"] = (u, lambda: self.request.foundation, True)
            steps.append((f"unseen/{u}/from-run", lambda u=u: self._train(u, self._final_model())))
            steps.append((f"unseen/{u}/from-M0", lambda u=u: self._train(u, self.request.foundation, from_m0=True)))
            steps.append((f"unseen/{u}/evaluate", lambda u=u: self._evaluate_unseen(u)))
        return steps

    def run(self) -> None:
        total = len(self.steps)
        checked = False
        for self.step_index, (key, func) in enumerate(self.steps, 1):
            if not checked and key not in ("plan", "union", "plan/union"):
                self._check_model_folders()  # before this run writes anything of its own
                checked = True
            if self.manifest.is_done(key):
                self.manifest.check_done_outputs(key)
                continue
            self.log(f"[{self.request.name}] step {self.step_index}/{total}: {key}")
            started = self.manifest.start(key, {"kind": key.split("/")[0]})
            try:
                outputs = func() or {}
            except BaseException as e:
                message = f"{type(e).__name__}: {e}" if not isinstance(e, KeyboardInterrupt) else "interrupted"
                self.manifest.fail(key, started, message)
                raise
            self.manifest.finish(key, started, outputs)

    # ------------------------------------------------------------ models of this run
    def _trainer(self, dataset: str) -> str:
        return UNSEEN_TRAINER if dataset in self.request.unseen else self.method.trainer

    def _plans_name(self, from_m0: bool = False) -> str:
        return reference_plans_name(self.base_plans, self.manifest.data["settings"]) if from_m0 \
            else run_plans_name(self.request.name)

    def _model_folder(self, dataset: str, from_m0: bool = False) -> str:
        return model_folder(dataset, self._trainer(dataset), self._plans_name(from_m0), self.request.configuration,
                            self.request.fold)

    def _task_model(self, dataset: str, which: str = "M") -> str:
        return os.path.join(self._model_folder(dataset),
                            "checkpoint_fft.pth" if which == "F" else "checkpoint_final.pth")

    def _start_model(self, i: int) -> str:
        if i == 0 or not self.method.chained:
            return self.request.foundation
        return self._task_model(self.request.datasets[i - 1])

    def _final_model(self) -> str:
        last = self._union_name() if self.method.union else self.request.datasets[-1]
        return self._task_model(last)

    # ------------------------------------------------------------ plan
    def _plan(self, datasets: list[str]) -> dict:
        from nnunetv2_medseqft.mds import preprocessed_root
        from nnunetv2_medseqft.plan_cli import plan_datasets

        with contextlib.ExitStack() as locks:  # runs of other names plan the same datasets: one at a time
            for dataset in sorted(datasets):
                folder = os.path.join(preprocessed_root(), dataset)
                os.makedirs(folder, exist_ok=True)
                lock = locks.enter_context(open(os.path.join(folder, ".medseqft_plan.lock"), "w"))
                fcntl.flock(lock, fcntl.LOCK_EX)
            plans_files = {d: os.path.join(preprocessed_root(), d, f"{self.base_plans}.json") for d in datasets}
            todo = [d for d in datasets if not self._is_preprocessed(d, plans_files[d])]
            if datasets != todo:
                self.log(f"  already planned and preprocessed as {self.base_plans}: "
                         f"{', '.join(d for d in datasets if d not in todo)}")
            if todo:
                log_file = os.path.join(self.folder, LOGS_FOLDER, f"{self.step_index:02d}_plan.log")
                self.log(f"  planning with the foundation's plans and preprocessing {', '.join(todo)} (log: {log_file})")
                with output_to(log_file):
                    plan_datasets(todo, self.request.foundation, self.request.configuration,
                                  num_processes=int(os.environ.get("nnUNet_def_n_proc", 2)), plans_name=self.base_plans)
        return {f"plans {d}": file_record(f) for d, f in plans_files.items()}

    def _is_preprocessed(self, dataset: str, plans_file: str) -> bool:
        from nnunetv2_medseqft.mds import preprocessed_root

        if not os.path.isfile(plans_file):
            return False
        plans = read_json(plans_file)
        if plans.get("medseqft", {}).get("foundation", {}).get("sha256") != self.foundation.sha256:
            return False
        cfg = plans["configurations"].get(self.request.configuration, {})
        data = os.path.join(preprocessed_root(), dataset, cfg.get("data_identifier", "?"))
        gt = os.path.join(preprocessed_root(), dataset, "gt_segmentations")
        n = read_json(os.path.join(os.environ["nnUNet_raw"], dataset, "dataset.json"))["numTraining"]
        return os.path.isdir(data) and sum(f.endswith(".pkl") for f in os.listdir(data)) == n and \
            os.path.isdir(gt) and len(os.listdir(gt)) == n

    def _write_run_plans(self, dataset: str, previous_model: str, from_m0: bool = False) -> str:
        from nnunetv2_medseqft.mds import preprocessed_root

        plans = self._run_plans(dataset, previous_model, from_m0)
        write_json_atomic(plans, os.path.join(preprocessed_root(), dataset, f"{plans['plans_name']}.json"))
        return plans["plans_name"]

    def _run_plans(self, dataset: str, previous_model: str, from_m0: bool = False) -> dict:
        """The base plans plus this run's settings; same data_identifier, so preprocessing is shared."""
        from nnunetv2_medseqft.mds import preprocessed_root

        plans = read_json(os.path.join(preprocessed_root(), dataset, f"{self.base_plans}.json"))
        name = self._plans_name(from_m0)
        r = self.request
        section = plans["medseqft"]
        section["mds"] = {**section.get("mds", {}), **r.mds, "seed": r.mds.get("seed", r.seed)}
        section.update(run=None if from_m0 else r.name, method="reference: full fine-tuning of M0" if from_m0
                       else r.method, seed=r.seed, rft=dict(r.rft), budget=dict(r.budget),
                       final_validation=r.nnunet_validation, previous_model=os.path.abspath(previous_model))
        plans["plans_name"] = name
        return plans

    # ------------------------------------------------------------ select
    def _select(self, i: int, dataset: str) -> dict:
        from nnunetv2_medseqft.mds import buffer_file_path, select_buffer

        plans = self._write_run_plans(dataset, self._start_model(i))
        record = select_buffer(dataset, self.request.fold, plans_name=plans, configuration=self.request.configuration,
                               device=self.request.device, progress=False, log=lambda *a: None)
        self.log(f"  MDS buffer of {dataset}: {' '.join(record['buffer'])}")
        return {"buffer": file_record(buffer_file_path(dataset, self.request.fold, plans, self.request.configuration))}

    # ------------------------------------------------------------ train
    def _train(self, dataset: str, start_model: str, from_m0: bool = False) -> dict:
        from nnunetv2_medseqft.mds import preprocessed_root

        if not os.path.isfile(start_model):
            raise MedSeqFTError(f"The start model of {dataset} is missing: {start_model}.")
        lock_file = os.path.join(preprocessed_root(), dataset, f".medseqft_train_{self._plans_name(from_m0)}.lock")
        with open(lock_file, "w") as lock:  # a shared M0 reference is trained by one run; the others wait, reuse
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._train_locked(dataset, start_model, from_m0)

    def _train_locked(self, dataset: str, start_model: str, from_m0: bool) -> dict:
        trainer = self._trainer(dataset)
        folder = self._model_folder(dataset, from_m0)
        final = os.path.join(folder, "checkpoint_final.pth")
        plans = self._write_run_plans(dataset, start_model, from_m0)
        if from_m0 and os.path.isfile(final):
            self.log(f"  reusing the M0 reference of {dataset} (same foundation, budget and seed): {final}")
        if not os.path.isfile(final):
            cmd = ["nnUNetv2_train", dataset, self.request.configuration, str(self.request.fold), "-tr", trainer,
                   "-p", plans, "-device", self.request.device]
            if os.path.isfile(os.path.join(folder, "checkpoint_latest.pth")):
                cmd.append("--c")  # an interrupted training continues where its last checkpoint left it
            else:
                cmd += ["-pretrained_weights", start_model]
            log_file = os.path.join(self.folder, LOGS_FOLDER, self._log_name(dataset, from_m0))
            epochs = int(self.request.budget.get("num_epochs") or 1000)
            remaining = self._remaining_train_steps()
            train_with_progress(cmd, log_file, label=self._label(dataset, from_m0), epochs=epochs,
                                later_seconds=lambda per_step: per_step * remaining, log=self.log)
        outputs = {"model": file_record(final)}
        fft = os.path.join(folder, "checkpoint_fft.pth")
        if os.path.isfile(fft) and dataset not in self.request.unseen:
            outputs["fft"] = file_record(fft)
        return outputs

    def _check_model_folders(self) -> None:
        """Checkpoints already in an unfinished step's model folder (an interrupted step, a shared reference, or
        a run folder that was deleted) are continued or reused only if trained with exactly these settings."""
        from nnunetv2_medseqft.checkpointing import load_checkpoint_file

        for key, (dataset, start, from_m0) in self.trainings.items():
            if self.manifest.is_done(key):
                continue
            folder = self._model_folder(dataset, from_m0)
            ours = self._run_plans(dataset, start(), from_m0)["medseqft"]
            for name in ("checkpoint_final.pth", "checkpoint_latest.pth"):
                path = os.path.join(folder, name)
                if os.path.isfile(path):
                    theirs = load_checkpoint_file(path)["init_args"]["plans"].get("medseqft", {})
                    diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
                    if diff:
                        raise MedSeqFTError(f"{path} was trained with other settings ({', '.join(diff)} differ) and "
                                            f"is not this run's. Move {folder} away, or choose another --name.")

    def _log_name(self, dataset: str, from_m0: bool) -> str:
        return f"{self.step_index:02d}_train_{dataset}{'_fromM0' if from_m0 else ''}.log"

    def _label(self, dataset: str, from_m0: bool) -> str:
        r = self.request
        if dataset in r.unseen:
            return f"unseen {dataset} from {'M0' if from_m0 else 'the final body'}"
        if self.method.union:
            return f"multitask on the union of {len(r.datasets)} tasks"
        return f"task {r.datasets.index(dataset) + 1}/{len(r.datasets)} {dataset} ({self._trainer(dataset)})"

    def _remaining_train_steps(self) -> int:
        keys = [k for k, _ in self.steps[self.step_index:]]
        return sum(k.startswith("train/") or (k.startswith("unseen/") and not k.endswith("/evaluate"))
                   for k in keys)

    # ------------------------------------------------------------ evaluate
    def _results(self) -> dict:
        path = os.path.join(self.folder, RESULTS_FILE)
        if os.path.isfile(path):
            return read_json(path)
        r = self.request
        return {"format": RESULTS_FORMAT, "run": r.name, "method": r.method, "seed": r.seed, "fold": r.fold,
                "tasks": list(r.datasets), "unseen": list(r.unseen), "scores": {}, "R": None, "summary": {},
                "unseen_scores": {}, "curves": {}}

    def _save_results(self, results: dict) -> dict:
        path = os.path.join(self.folder, RESULTS_FILE)
        write_json_atomic(results, path)
        return {"results": {"path": path}}

    def _validation(self, dataset: str, plans: str | None = None, model_dataset_json: dict | None = None):
        from nnunetv2_medseqft.evaluate import ValidationSet

        return ValidationSet.load(dataset, plans or run_plans_name(self.request.name), self.request.configuration,
                                  self.request.fold, device=self.request.device, mirror=self.request.mirror,
                                  model_dataset_json=model_dataset_json)

    def _evaluate_task(self, dataset: str) -> dict:
        from nnunetv2_medseqft.evaluate import load_weights, training_curves
        from nnunetv2_medseqft.overlays import overlay_file

        val = self._validation(dataset)
        scores = {"M": val.score(load_weights(self._task_model(dataset)), overlay=overlay_file(self.folder, dataset))}
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
        from nnunetv2_medseqft.evaluate import continual_metrics, load_weights, with_head

        tasks = self.request.datasets
        bodies = [self.foundation.checkpoint["network_weights"]] + [load_weights(self._task_model(d)) for d in tasks]
        dice = [[None] * len(tasks) for _ in bodies]
        hd95 = [[None] * len(tasks) for _ in bodies]
        for j, d in enumerate(tasks):
            val = self._validation(d)
            head = bodies[j + 1]
            for i, body in enumerate(bodies):
                s = val.score(with_head(body, head))["mean"]
                dice[i][j], hd95[i][j] = s["dice"], s["hd95"]
        results = self._results()
        results["R"] = {"rows": ["M0"] + list(tasks), "cols": list(tasks), "dice": dice, "hd95": hd95}
        results["summary"] = {**continual_metrics(dice), **self._mean_scores(results)}
        self.log("  " + ", ".join(f"{k.upper()} {v:.1f}" for k, v in results["summary"].items() if v is not None))
        return self._save_results(results)

    def _mean_scores(self, results: dict) -> dict:
        m = [results["scores"][d]["M"]["mean"] for d in self.request.datasets if d in results["scores"]]
        return {f"mean_{k}": _mean([s[k] for s in m]) for k in ("dice", "hd95")}

    def _evaluate_unseen(self, dataset: str) -> dict:
        from nnunetv2_medseqft.evaluate import load_weights

        val = self._validation(dataset)
        from_run = val.score(load_weights(os.path.join(self._model_folder(dataset), "checkpoint_final.pth")))
        from_m0 = val.score(load_weights(os.path.join(self._model_folder(dataset, True), "checkpoint_final.pth")))
        results = self._results()
        results["unseen_scores"][dataset] = {"from_run": from_run, "from_m0": from_m0}
        self.log(f"  unseen {dataset}: Dice from the final body {_pts(from_run['mean']['dice'])}, "
                 f"from M0 {_pts(from_m0['mean']['dice'])}")
        return self._save_results(results)

    # ------------------------------------------------------------ multitask
    def _union_name(self) -> str:
        record = self.manifest.step("union") or {}
        name = (record.get("outputs") or {}).get("dataset")
        if not name:
            raise MedSeqFTError("The union dataset of this multitask run is not built yet.")
        return name

    def _union(self) -> dict:
        from nnunetv2_medseqft.union_dataset import build_union_dataset

        name = build_union_dataset(self.request.datasets, self.request.name, self.request.fold,
                                   self.base_plans, self.request.configuration, self.request.union_id)
        # recorded before planning/training, so that a resumed run reuses the same dataset
        return {"dataset": name}

    def _evaluate_union(self) -> dict:
        from nnunetv2_medseqft.evaluate import load_weights, training_curves
        from nnunetv2_medseqft.union_dataset import label_map_for

        union = self._union_name()
        union_json = read_json(os.path.join(os.environ["nnUNet_raw"], union, "dataset.json"))
        weights = load_weights(self._task_model(union))
        results = self._results()
        for d in self.request.datasets:
            val = self._validation(d, plans=self.base_plans, model_dataset_json=union_json)
            results["scores"][d] = {"M": val.score(weights, label_map_for(union_json, d))}
            self.log(f"  {d}: Dice of the multitask model {_pts(results['scores'][d]['M']['mean']['dice'])}")
        results["curves"][union] = training_curves(self._task_model(union))
        dice = [results["scores"][d]["M"]["mean"]["dice"] for d in self.request.datasets]
        results["summary"] = {"acc": _mean(dice), "bwt": None, "fwt": None, **self._mean_scores(results)}
        return self._save_results(results)


# ---------------------------------------------------------------- entry points

def run_sequence(request: RunRequest, log=print) -> str:
    """Run (or resume) a sequence; returns the run folder."""
    foundation = validate(request)
    folder = run_folder(request.name)
    os.makedirs(os.path.join(folder, LOGS_FOLDER), exist_ok=True)
    os.environ.setdefault("nnUNet_compile", "f" if request.device == "cpu" else "t")
    with RunLock(folder):
        manifest = Manifest.open(folder, request.name, request.settings(foundation.sha256), request.command)
        manifest.data["foundation"] = {"path": os.path.abspath(request.foundation), "sha256": foundation.sha256}
        manifest.data["command"] = request.command
        manifest.save()
        runner = Runner(request, foundation, manifest, log=log)
        try:
            runner.run()
        except (Exception, KeyboardInterrupt) as e:
            log(f"[{request.name}] stopped: everything finished so far is kept in {folder}.")
            log(f"Resume with: {request.command}")
            if isinstance(e, MedSeqFTError):
                raise
            raise MedSeqFTError(f"{type(e).__name__}: {e}") from e
    log(f"[{request.name}] done: {os.path.join(folder, RESULTS_FILE)}")
    return folder


def evaluate_run(name_or_path: str, log=print) -> str:
    """Re-score every finished model of a run (its own settings) into results.json; trains nothing."""
    from nnunetv2_medseqft.run_layout import resolve_run

    folder = resolve_run(name_or_path)
    with RunLock(folder):
        data = read_json(os.path.join(folder, "manifest.json"))
        st = data["settings"]
        request = RunRequest(name=data["name"], method=st["method"], foundation=data["foundation"]["path"],
                             datasets=st["datasets"], unseen=st["unseen"], fold=st["fold"], seed=st["seed"],
                             configuration=st["configuration"], budget=st["budget"], rft=st["rft"], mds=st["mds"],
                             mirror=st["evaluation_mirroring"], nnunet_validation=st["nnunet_final_validation"],
                             command=data.get("command", ""))
        foundation = validate(request)
        manifest = Manifest.open(folder, request.name, request.settings(foundation.sha256), request.command)
        runner = Runner(request, foundation, manifest, log=log)
        trained = True  # an evaluation step needs every training before it
        for key, func in runner.steps:
            if key.startswith("evaluate/") or key.endswith("/evaluate"):
                if trained:
                    log(f"[{request.name}] scoring: {key}")
                    func()
            elif key.startswith(("train/", "unseen/")):
                trained = trained and manifest.is_done(key)
    return folder


def _evaluate_cmd(args) -> int:
    evaluate_run(args.run)
    return 0


def _key_value(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise MedSeqFTError(f"Bad setting {text!r}: use KEY=VALUE, e.g. lambda_g=0.5.")
    key, value = text.split("=", 1)
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, {"none": None, "true": True, "false": False}.get(value.lower(), value)


def request_from_args(args) -> RunRequest:
    budget = {k: v for k, v in (("num_epochs", args.epochs), ("iterations", args.iterations),
                                ("val_iterations", args.val_iterations)) if v is not None}
    return RunRequest(name=args.name, method=args.method, foundation=args.foundation, datasets=args.datasets,
                      unseen=args.unseen or [], fold=args.fold, seed=args.seed, configuration=args.c,
                      budget=budget, rft=dict(_key_value(t) for t in args.rft or []),
                      mds=dict(_key_value(t) for t in args.mds or []), mirror=args.mirror, device=args.device,
                      nnunet_validation=args.nnunet_validation, union_id=args.union_id,
                      command=" ".join(shlex.quote(a) for a in ["medseqft", "run"] + list(args.argv)))


def run(args) -> int:
    run_sequence(request_from_args(args))
    return 0


def configure_parser(parser, name: str) -> None:
    if name == "evaluate":
        parser.add_argument("run", metavar="RUN", help="run name (under $nnUNet_results/medseqft_runs) or folder")
        parser.set_defaults(func=_evaluate_cmd)
        return
    parser.add_argument("--foundation", required=True, help="foundation checkpoint_final.pth (MedSeqFTPretrainTrainer)")
    parser.add_argument("--datasets", nargs="+", required=True, help="dataset ids or names, in task order")
    parser.add_argument("--unseen", nargs="*", default=[], help="unseen datasets for the transfer test")
    parser.add_argument("--method", default="medseqft", choices=sorted(METHODS),
                        help="; ".join(f"{m.name}: {m.description}" for m in METHODS.values()))
    parser.add_argument("--name", required=True, help="run name: results under $nnUNet_results/medseqft_runs/NAME")
    parser.add_argument("--fold", default="0", help="fold of nnU-Net's 5-fold split (default 0) or 'all'")
    parser.add_argument("--seed", type=int, default=0, help="seed of the run (MDS draws, random buffer, head init)")
    parser.add_argument("-c", default="3d_fullres", help="configuration (default 3d_fullres)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per training (default: nnU-Net's 1000)")
    parser.add_argument("--iterations", type=int, default=None, help="iterations per epoch (default: 250)")
    parser.add_argument("--val-iterations", type=int, default=None, help="validation iterations per epoch (50)")
    parser.add_argument("--rft", nargs="*", metavar="KEY=VALUE",
                        help="K&G RFT settings, e.g. lambda_g=0.5 lora_rank=4 (see README, Settings)")
    parser.add_argument("--mds", nargs="*", metavar="KEY=VALUE", help="MDS settings, e.g. repeats=64 k=4")
    parser.add_argument("--mirror", action="store_true", help="evaluate with test-time mirroring (8x slower in 3D)")
    parser.add_argument("--nnunet-validation", action="store_true",
                        help="also run nnU-Net's own final validation after each training (the run scores every "
                             "model itself, so it is off by default)")
    parser.add_argument("-device", "--device", default="cpu", choices=("cpu", "cuda", "mps"),
                        help="device for training and evaluation (default cpu)")
    parser.add_argument("--union-id", type=int, default=None,
                        help="multitask: dataset id for the union dataset (default: the highest free id)")
    parser.set_defaults(func=run)
