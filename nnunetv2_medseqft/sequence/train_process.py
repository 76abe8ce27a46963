"""One ``nnUNetv2_train`` child process: its full log goes to a file, a one-line progress to the console."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections import deque

from nnunetv2_medseqft.errors import MedSeqFTError

EPOCH = re.compile(r"^.*?Epoch (\d+)(?: \(MedSeqFT stage (\w)\))?\s*$")
EPOCH_TIME = re.compile(r"Epoch time: ([\d.]+) s")


def child_env() -> dict:
    """This process' environment plus what lets nnU-Net find our trainers (never the user's shell)."""
    from nnunetv2_medseqft.plugin.discovery import shim_dir

    env = dict(os.environ)
    paths = [p for p in env.get("nnUNet_extTrainer", "").split(":") if p]
    if shim_dir() not in paths:
        env["nnUNet_extTrainer"] = ":".join([shim_dir()] + paths)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _command(cmd: list[str]) -> list[str]:
    """Console scripts of this interpreter's environment first (a venv need not be activated)."""
    local = os.path.join(os.path.dirname(sys.executable), cmd[0])
    return [local] + cmd[1:] if os.path.isfile(local) else cmd


def _fmt(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def keep_previous_attempt(path: str) -> str | None:
    """Move an earlier attempt's file to ``<name>.attempt<N><ext>`` (N = 1, 2, ...) so a retry never replaces it."""
    if not os.path.exists(path):
        return None
    stem, ext = os.path.splitext(path)
    n = 1
    while os.path.exists(f"{stem}.attempt{n}{ext}"):
        n += 1
    os.replace(path, f"{stem}.attempt{n}{ext}")
    return f"{stem}.attempt{n}{ext}"


def train_with_progress(cmd: list[str], log_file: str, label: str, epochs: int, later_seconds=None,
                        log=print, poll: float = 1.0) -> None:
    """Run ``cmd``; print one line per epoch (epoch, stage, time per epoch, ETA of this step and of the run).

    ``later_seconds(step_seconds)`` estimates the rest of the run from this step's projected duration."""
    os.makedirs(os.path.dirname(log_file), exist_ok=True)
    keep_previous_attempt(log_file)
    log(f"  {label}: {' '.join(cmd)}")
    log(f"    log: {log_file}")
    start = time.time()
    tail: deque[str] = deque(maxlen=40)
    epoch_times: list[float] = []
    with open(log_file, "w") as out, open(log_file) as reader:
        proc = subprocess.Popen(_command(cmd), stdout=out, stderr=subprocess.STDOUT, env=child_env())
        current = None
        try:
            while True:
                done = proc.poll() is not None
                for line in reader.readlines():
                    tail.append(line.rstrip("\n"))
                    if m := EPOCH_TIME.search(line):
                        epoch_times.append(float(m.group(1)))
                    elif m := EPOCH.match(line.strip()):
                        current = (int(m.group(1)), m.group(2))
                        per_epoch = sum(epoch_times[-5:]) / len(epoch_times[-5:]) if epoch_times else None
                        text = f"    epoch {current[0] + 1}/{epochs}" + (f" stage {current[1]}" if current[1] else "")
                        if per_epoch:
                            left = per_epoch * (epochs - current[0])
                            text += f" · {per_epoch:.1f} s/epoch · step ETA {_fmt(left)}"
                            if later_seconds is not None:
                                text += f" · run ETA ~{_fmt(left + later_seconds(per_epoch * epochs))}"
                        log(text)
                if done:
                    break
                time.sleep(poll)
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if proc.returncode != 0:
        raise child_failure(cmd, proc.returncode, log_file, list(tail))
    log(f"    finished in {_fmt(time.time() - start)}")


def first_error(lines: list[str]) -> str | None:
    """The exception that ended the first traceback in a log: the cause, not the 'background workers are no
    longer alive' that nnU-Net's main process reports after a loader worker died of it."""
    inside = False
    for line in lines:
        if line.startswith("Traceback (most recent call last):"):
            inside = True
        elif inside and line and not line[0].isspace():
            return line.strip()
    return None


def child_failure(cmd: list[str], returncode: int, log_file: str, tail: list[str]) -> MedSeqFTError:
    """The error of a failed child: its first exception and its log. Resuming helps when the child crashed or
    was killed; not when it refused its input (a MedSeqFTError of its own names the fix)."""
    with open(log_file, errors="replace") as f:
        cause = first_error(f.read().splitlines())
    refused = bool(cause) and "MedSeqFTError" in cause
    head = f"{' '.join(cmd)} failed (exit {returncode})."
    if cause:
        head += f"\nFirst error in its log: {cause}"
    last = "\n".join(tail[-15:])
    return MedSeqFTError(f"{head}\nLog: {log_file}\nLast lines:\n{last}", resumable=not refused)


@contextlib.contextmanager
def output_to(log_file: str):
    """Send this process' stdout/stderr, and its children's (nnU-Net's worker pools), to a log file."""
    os.makedirs(os.path.dirname(log_file), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_file, "a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
