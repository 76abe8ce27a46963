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
  unseen/U/...  full fine-tuning of the run's final body and of M0 (plans ``MedSeqFTPlans-<sha>.fromM0-<key>``)
                on each unseen dataset, then both evaluated
Full fine-tuning of M0 on a dataset (the unseen reference, parallel FFT's tasks, seqFFT's first task, the stage A
of MedSeqFT's first task) is one training per foundation, budget, seed and fold, shared by every run that needs it
(``_is_m0_reference``, ``_stage_a_is_m0_reference``).
"""

from __future__ import annotations

import os
from contextlib import ExitStack

from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.method.foundation import start_from_foundation
from nnunetv2_medseqft.method.settings import RFTSettings
from nnunetv2_medseqft.paths import model_folder, portable
from nnunetv2_medseqft.sequence.layout import LOGS_FOLDER, RESULTS_FILE, run_folder
from nnunetv2_medseqft.sequence.manifest import (
    MARGINAL_MULTITASK,
    SHARED_M0_TASKS,
    SHARED_STAGE_A,
    Manifest,
    RunLock,
)
from nnunetv2_medseqft.sequence.recipes import UNSEEN_TRAINER, Method, get_method
from nnunetv2_medseqft.sequence.request import (
    RunRequest,
    base_plans_name,
    reference_plans_name,
    rft_resume_flags,
    run_plans_name,
    validate,
)
from nnunetv2_medseqft.sequence.run_record import read_run
from nnunetv2_medseqft.sequence.scoring import ScoringSteps
from nnunetv2_medseqft.sequence.steps import TaskSteps
from nnunetv2_medseqft.threads import refresh_torch_threads


class Runner(TaskSteps, ScoringSteps):
    """The step graph of one run and the loop that walks it; the steps themselves live in ``steps.py``
    (plan, select, train) and ``scoring.py`` (evaluate)."""

    def __init__(self, request: RunRequest, foundation, manifest: Manifest, log=print,
                 results_folder: str | None = None):
        """``results_folder``: where scores and overlays go (default the run folder; ``medseqft evaluate --out``)."""
        self.request, self.foundation, self.manifest, self.log = request, foundation, manifest, log
        self.method: Method = get_method(request.method)
        self.folder = manifest.folder
        self.results_folder = results_folder or manifest.folder
        self.base_plans = base_plans_name(foundation.sha256)
        self.step_index = 0
        self.steps = self._plan_steps()

    # ------------------------------------------------------------ step list
    def _plan_steps(self) -> list[tuple[str, callable]]:
        r, m = self.request, self.method
        self.trainings = {}  # step -> [(dataset, start model, from M0)]: what _check_model_folders inspects
        steps = [("plan", lambda: self._plan(r.datasets + r.unseen))]
        if m.union:
            steps += [("union", self._union), ("plan/union", lambda: self._plan([self._union_name()])),
                      ("train/union", lambda: self._train(self._union_name(), self._m0_start())),
                      ("evaluate/union", self._evaluate_union)]
        else:
            for i, d in enumerate(r.datasets):
                if m.mds:
                    steps.append((f"select/{d}", lambda i=i, d=d: self._select(i, d)))
                shared = self._is_m0_reference(d)
                self.trainings[f"train/{d}"] = [(d, lambda i=i: self._start_model(i), shared)]
                if self._stage_a_is_m0_reference(d):
                    self.trainings[f"train/{d}"].insert(0, (d, self._m0_start, True))
                steps.append((f"train/{d}", lambda i=i, d=d, shared=shared: self._train_task(i, d, shared)))
                steps.append((f"evaluate/{d}", lambda d=d: self._evaluate_task(d)))
            steps.append(("evaluate/R", self._evaluate_r))
        for u in r.unseen:
            self.trainings[f"unseen/{u}/from-run"] = [(u, self._final_model, False)]
            self.trainings[f"unseen/{u}/from-M0"] = [(u, self._m0_start, True)]
            steps.append((f"unseen/{u}/from-run", lambda u=u: self._train(u, self._final_model())))
            steps.append((f"unseen/{u}/from-M0", lambda u=u: self._train(u, self._m0_start(), from_m0=True)))
            steps.append((f"unseen/{u}/evaluate", lambda u=u: self._evaluate_unseen(u)))
        return steps

    def run(self) -> None:
        total = len(self.steps)
        checked = False
        for index, (key, func) in enumerate(self.steps, 1):
            self.step_index = index
            if not checked and key not in ("plan", "union", "plan/union"):
                self._check_model_folders()  # before this run writes anything of its own
                checked = True
            if self.manifest.is_done(key):
                self.manifest.check_done_outputs(key)
                continue
            self.log(f"[{self.request.name}] step {self.step_index}/{total}: {key}")
            refresh_torch_threads()  # a lane beside this run may have finished (medseqft demo)
            started = self.manifest.start(key, {"kind": key.split("/")[0]})
            try:
                outputs = func() or {}
            except BaseException as e:
                message = f"{type(e).__name__}: {e}" if not isinstance(e, KeyboardInterrupt) else "interrupted"
                self.manifest.fail(key, started, message)
                raise
            self.manifest.finish(key, started, outputs)

    # ------------------------------------------------------------ models of this run
    def _trainer(self, dataset: str, from_m0: bool = False) -> str:
        if from_m0 or dataset in self.request.unseen \
                or (self.method.union and not self.manifest.data.get(MARGINAL_MULTITASK)):
            return UNSEEN_TRAINER  # (a multitask run begun before the marginal loss keeps its plain merge)
        return self.method.trainer

    def _plans_name(self, from_m0: bool = False) -> str:
        return reference_plans_name(self.base_plans, self.manifest.data["settings"]) if from_m0 \
            else run_plans_name(self.request.name)

    def _model_folder(self, dataset: str, from_m0: bool = False) -> str:
        return model_folder(dataset, self._trainer(dataset, from_m0), self._plans_name(from_m0),
                            self.request.configuration, self.request.fold)

    def _is_m0_reference(self, dataset: str) -> bool:
        """A task of the sequence that is plain full fine-tuning of M0 (parallel FFT's tasks, seqFFT's first) with the
        run's budget and seed is the M0 reference that unseen tasks use: trained once, in the reference's folder, and
        reused by every run that agrees (``reference_plans_name``). Runs started before this sharing keep their
        own folders (no ``SHARED_M0_TASKS`` mark in their manifest)."""
        r, m = self.request, self.method
        if not self.manifest.data.get(SHARED_M0_TASKS) or m.union or m.trainer != UNSEEN_TRAINER \
                or dataset not in r.datasets:  # (--rft is moot for the FFT trainer: stage A only)
            return False
        return not m.chained or dataset == r.datasets[0]

    def _stage_a_is_m0_reference(self, dataset: str) -> bool:
        """A two-stage method's first task starts from M0, and with rft budget=fft_full its stage A is full
        fine-tuning of M0 with the run's budget and seed: the M0 reference of that task (parallel FFT's, seqFFT's).
        It is trained once and shared; the task's trainer takes it as F_t (plans' medseqft.fft_model) and trains
        stage B only. Runs begun before this sharing train their own stage A (no ``SHARED_STAGE_A`` mark)."""
        r, m = self.request, self.method
        return bool(self.manifest.data.get(SHARED_STAGE_A)) and m.two_stage and dataset == r.datasets[0] \
            and RFTSettings.from_dict(self._trainer_rft()).budget == "fft_full"

    def _task_model(self, dataset: str, which: str = "M") -> str:
        return os.path.join(self._model_folder(dataset, self._is_m0_reference(dataset)),
                            "checkpoint_fft.pth" if which == "F" else "checkpoint_final.pth")

    def _start_model(self, i: int) -> str:
        if i == 0 or not self.method.chained:
            return self._m0_start()
        return self._task_model(self.request.datasets[i - 1])

    def _m0_start(self) -> str:
        """What a task that starts from M0 loads: the foundation itself, or the derived start of --m0-transfer."""
        if self.request.m0_transfer == "full":
            return self.request.foundation
        out = os.path.join(self.folder, "start_models", f"m0_{self.request.m0_transfer}_s{self.request.seed}.pth")
        return start_from_foundation(self.foundation, self.request.m0_transfer, self.request.seed, out)

    def _final_model(self) -> str:
        last = self._union_name() if self.method.union else self.request.datasets[-1]
        return self._task_model(last)


# ---------------------------------------------------------------- entry points

def run_sequence(request: RunRequest, log=print) -> str:
    """Run (or resume) a sequence; returns the run folder."""
    foundation = validate(request)
    folder = run_folder(request.name)
    os.makedirs(os.path.join(folder, LOGS_FOLDER), exist_ok=True)
    os.environ.setdefault("nnUNet_compile", "f" if request.device == "cpu" else "t")
    with RunLock(folder):
        manifest = Manifest.open(folder, request.name, request.settings(foundation.sha256), request.command,
                                 stored_hint=lambda stored: _rft_hint(request, stored))
        # saved with the next step: a re-run that is refused (or has nothing left to do) leaves the manifest as it was
        manifest.data["foundation"] = {"path": portable(request.foundation), "sha256": foundation.sha256}
        manifest.data.setdefault("command", request.command)  # the first command: resumes repeat its settings
        if not manifest.data["steps"]:
            # a new run; one begun before lacks the mark
            for mark in (SHARED_M0_TASKS, MARGINAL_MULTITASK, SHARED_STAGE_A):
                manifest.data.setdefault(mark, True)
            manifest.save()
        runner = Runner(request, foundation, manifest, log=log)
        try:
            runner.run()
        except (Exception, KeyboardInterrupt) as e:
            log(f"[{request.name}] stopped: everything finished so far is kept in {folder}.")
            if not isinstance(e, MedSeqFTError) or e.resumable:
                log(f"Resume with: {request.command}")
            else:
                log("Resuming with the same command cannot get past this: fix what the message below names, then "
                    f"resume with: {request.command}")
            if isinstance(e, MedSeqFTError):
                raise
            raise MedSeqFTError(f"{type(e).__name__}: {e}", resumable=True) from e
    log(f"[{request.name}] done: {os.path.join(folder, RESULTS_FILE)}")
    return folder

def evaluate_run(name_or_path: str, out: str | None = None, log=print) -> str:
    """Re-score every finished model of a run (its own settings) into results.json; trains nothing.

    ``out``: write results.json and the overlays there instead of the run folder, which is only read (a read-only
    archive, a colleague's run); returns the folder that holds the results."""
    folder, data = read_run(name_or_path)
    if out is None:
        with RunLock(folder):
            return _evaluate(folder, data, None, log)
    out, folder = os.path.abspath(out), os.path.abspath(folder)
    if os.path.commonpath([out, folder]) == folder:
        raise MedSeqFTError(f"--out {out} lies inside the run folder {folder}: choose a folder elsewhere.")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise MedSeqFTError(f"--out {out} cannot be created ({e.strerror or e}): choose a folder you can write.") \
            from None
    with ExitStack() as stack:
        try:
            stack.enter_context(RunLock(folder))  # keeps a resuming run from changing models while they are scored
        except OSError:
            pass  # a folder nobody can write: no run can change it either
        return _evaluate(folder, data, out, log)


def _rft_hint(request: RunRequest, stored: dict) -> str:
    """After a change of the default readings the stored command means other readings: name them."""
    flags = rft_resume_flags(request.method, stored.get("rft", {}))
    return f", with --rft {' '.join(flags)}" if stored.get("rft", {}) != request.rft and flags else ""


def _evaluate(folder: str, data: dict, out: str | None, log) -> str:
    request = RunRequest.from_manifest(data)
    foundation = validate(request, writes=out is None)
    manifest = Manifest.open(folder, request.name, request.settings(foundation.sha256), request.command)
    runner = Runner(request, foundation, manifest, log=log, results_folder=out)
    trained = True  # an evaluation step needs every training before it
    for key, func in runner.steps:
        if key.startswith("evaluate/") or key.endswith("/evaluate"):
            if trained:
                log(f"[{request.name}] scoring: {key}")
                func()
        elif key.startswith(("train/", "unseen/")):
            trained = trained and manifest.is_done(key)
    return runner.results_folder
