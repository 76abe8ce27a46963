"""The steps of a run that write models and data: plan + preprocess, the MDS buffer, ``nnUNetv2_train`` per
task (in a subprocess, under a lock, continuing an interrupted training) and the multitask union dataset."""

from __future__ import annotations

import contextlib
import fcntl
import os

from nnunetv2_medseqft.checkpoints import load_checkpoint_file, loadable_here
from nnunetv2_medseqft.cli.plan import plan_datasets
from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.jsonio import read_json, write_json_atomic
from nnunetv2_medseqft.method.buffer import buffer_file_path, select_buffer
from nnunetv2_medseqft.method.settings import RFTSettings
from nnunetv2_medseqft.paths import portable, preprocessed_root, raw_dataset_json, resolved
from nnunetv2_medseqft.sequence.layout import LOGS_FOLDER
from nnunetv2_medseqft.sequence.manifest import file_record
from nnunetv2_medseqft.sequence.train_process import keep_previous_attempt, output_to, train_with_progress
from nnunetv2_medseqft.sequence.union_dataset import build_union_dataset


# What the shared M0 reference of a dataset records but does not depend on: which run trained it (its start file in
# that run's folder: the start's content follows from the reference's plans name), and that run's --rft and --mds.
NOT_THE_REFERENCE = ("previous_model", "rft", "mds")


class TaskSteps:
    """Runner steps that plan, select and train (mixed into ``Runner``)."""

    # ------------------------------------------------------------ plan
    def _plan(self, datasets: list[str]) -> dict:

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
                warnings = []
                with output_to(log_file):
                    plan_datasets(todo, self.foundation, self.request.configuration,
                                  num_processes=int(os.environ.get("nnUNet_def_n_proc", 2)), plans_name=self.base_plans,
                                  warn=warnings.append)
                for w in warnings:  # on the console, not only in the log
                    self.log(f"  {w}")
        return {f"plans {d}": file_record(f) for d, f in plans_files.items()}

    def _is_preprocessed(self, dataset: str, plans_file: str) -> bool:

        if not os.path.isfile(plans_file):
            return False
        plans = read_json(plans_file)
        if plans.get("medseqft", {}).get("foundation", {}).get("sha256") != self.foundation.sha256:
            return False
        cfg = plans["configurations"].get(self.request.configuration, {})
        data = os.path.join(preprocessed_root(), dataset, cfg.get("data_identifier", "?"))
        gt = os.path.join(preprocessed_root(), dataset, "gt_segmentations")
        n = raw_dataset_json(dataset)["numTraining"]
        return os.path.isdir(data) and sum(f.endswith(".pkl") for f in os.listdir(data)) == n and \
            os.path.isdir(gt) and len(os.listdir(gt)) == n

    def _write_run_plans(self, dataset: str, previous_model: str, from_m0: bool = False) -> str:

        plans = self._run_plans(dataset, previous_model, from_m0)
        write_json_atomic(plans, os.path.join(preprocessed_root(), dataset, f"{plans['plans_name']}.json"))
        return plans["plans_name"]

    def _run_plans(self, dataset: str, previous_model: str, from_m0: bool = False) -> dict:
        """The base plans plus this run's settings; same data_identifier, so preprocessing is shared."""

        plans = read_json(os.path.join(preprocessed_root(), dataset, f"{self.base_plans}.json"))
        name = self._plans_name(from_m0)
        r = self.request
        section = plans["medseqft"]
        section["mds"] = {**section.get("mds", {}), **r.mds, "seed": r.mds.get("seed", r.seed)}
        section.update(run=None if from_m0 else r.name, method="reference: full fine-tuning of M0" if from_m0
                       else r.method, seed=r.seed, rft=self._trainer_rft(from_m0), budget=dict(r.budget),
                       final_validation=r.nnunet_validation, previous_model=portable(previous_model))
        if not from_m0 and self._stage_a_is_m0_reference(dataset):  # F_t given: the trainer trains stage B only
            section["fft_model"] = portable(self._m0_reference_model(dataset))
        plans["plans_name"] = name
        return plans

    def _trainer_rft(self, from_m0: bool = False) -> dict:
        """The plans' rft: every reading explicit for the MedSeqFT methods (the run's, whatever the trainer's
        defaults are now), the run's --rft as given for the others, none for the M0 reference (full fine-tuning)."""
        if from_m0:
            return {}
        if not self.method.two_stage:
            return dict(self.request.rft)
        return RFTSettings.for_trainer(self.request.rft)

    # ------------------------------------------------------------ select
    def _select(self, i: int, dataset: str) -> dict:

        plans = self._write_run_plans(dataset, self._start_model(i))
        record = select_buffer(dataset, self.request.fold, plans_name=plans, configuration=self.request.configuration,
                               device=self.request.device, progress=False, log=lambda line: self.log(f"  {line}"))
        self.log(f"  MDS buffer of {dataset}: {' '.join(record['buffer'])}")
        return {"buffer": file_record(buffer_file_path(dataset, self.request.fold, plans, self.request.configuration))}

    # ------------------------------------------------------------ train
    def _m0_reference_model(self, dataset: str) -> str:
        return os.path.join(self._model_folder(dataset, from_m0=True), "checkpoint_final.pth")

    def _train_task(self, i: int, dataset: str, from_m0: bool) -> dict:
        """Task i of the sequence; a stage A that is the M0 reference is trained (or found) first."""
        if self._stage_a_is_m0_reference(dataset):
            self._train(dataset, self._m0_start(), from_m0=True)
            self.log(f"  stage A of {dataset} is the M0 reference (full fine-tuning of M0, same budget and seed; "
                     f"shared with parallel FFT and seqFFT): {self._m0_reference_model(dataset)}")
        return self._train(dataset, self._start_model(i), from_m0=from_m0)

    def _train(self, dataset: str, start_model: str, from_m0: bool = False) -> dict:

        if not os.path.isfile(start_model):
            raise MedSeqFTError(f"The start model of {dataset} is missing: {start_model}.")
        lock_file = os.path.join(preprocessed_root(), dataset, f".medseqft_train_{self._plans_name(from_m0)}.lock")
        with open(lock_file, "w") as lock:  # a shared M0 reference is trained by one run; the others wait, reuse
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._train_locked(dataset, start_model, from_m0)

    def _train_locked(self, dataset: str, start_model: str, from_m0: bool) -> dict:
        trainer = self._trainer(dataset, from_m0)
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
                if os.path.isdir(folder) and os.listdir(folder):  # an attempt that died before its first checkpoint
                    self.log(f"  keeping the previous attempt's files in {keep_previous_attempt(folder)}")
                cmd += ["-pretrained_weights", loadable_here(start_model, os.path.join(self.folder, "start_models"))]
            log_file = os.path.join(self.folder, LOGS_FOLDER, self._log_name(dataset, from_m0))
            epochs = int(self.request.budget.get("num_epochs") or 1000)
            if trainer == self.method.trainer and self.method.two_stage:  # fft_full: B on top
                epochs += RFTSettings.from_dict(self._trainer_rft()).stage_b_extra_epochs(epochs)
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

        for key, trainings in self.trainings.items():
            if self.manifest.is_done(key):
                continue
            for dataset, start, from_m0 in trainings:
                self._check_model_folder(dataset, start, from_m0)

    def _check_model_folder(self, dataset: str, start, from_m0: bool) -> None:
        folder = self._model_folder(dataset, from_m0)
        ours = self._run_plans(dataset, start(), from_m0)["medseqft"]
        for name in ("checkpoint_final.pth", "checkpoint_latest.pth"):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                theirs = dict(load_checkpoint_file(path)["init_args"]["plans"].get("medseqft", {}))
                if theirs.get("previous_model"):  # an older run's absolute record, or one from before a move
                    theirs["previous_model"] = portable(resolved(theirs["previous_model"]))
                diff = sorted(k for k in set(ours) | set(theirs)
                              if ours.get(k) != theirs.get(k) and not (from_m0 and k in NOT_THE_REFERENCE))
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
        return f"task {r.datasets.index(dataset) + 1}/{len(r.datasets)} {dataset} ({self._trainer(dataset, from_m0)})"

    def _remaining_train_steps(self) -> int:
        keys = [k for k, _ in self.steps[self.step_index:]]
        return sum(k.startswith("train/") or (k.startswith("unseen/") and not k.endswith("/evaluate"))
                   for k in keys)

    # ------------------------------------------------------------ multitask
    def _union_name(self) -> str:
        record = self.manifest.step("union") or {}
        name = (record.get("outputs") or {}).get("dataset")
        if not name:
            raise MedSeqFTError("The union dataset of this multitask run is not built yet.")
        return name

    def _union(self) -> dict:

        name = build_union_dataset(self.request.datasets, self.request.name, self.request.fold,
                                   self.base_plans, self.request.configuration, self.request.union_id)
        # recorded before planning/training, so that a resumed run reuses the same dataset
        return {"dataset": name}
