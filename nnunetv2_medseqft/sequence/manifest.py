"""The manifest of a ``medseqft run``: one record per step, written atomically after every change.

A step is done when its record says so; a re-run skips done steps (after checking that their outputs
are still there) and continues at the first unfinished one. The settings are stored once: the same
run name with other settings is refused rather than mixed. A lock file (``flock``, released by the
kernel when the process dies) keeps two processes off one run.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from datetime import datetime, timezone

from nnunetv2_medseqft.checkpoints import sha256_file
from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.jsonio import read_json, write_json_atomic
from nnunetv2_medseqft.paths import portable, resolved
from nnunetv2_medseqft.sequence.layout import LOCK_FILE, MANIFEST_FILE

FORMAT = "medseqft-run-manifest"
VERSION = 1
# set in the manifest of every run begun since full fine-tunings of M0 on a sequence's tasks are shared (runner.py)
SHARED_M0_TASKS = "shared_m0_tasks"
# set in every run begun since the multitask reference trains with the marginal loss (trainers/multitask.py)
MARGINAL_MULTITASK = "marginal_multitask"
# set in every run begun since a two-stage method's first task takes its stage A from the shared M0 reference
SHARED_STAGE_A = "shared_stage_a"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def file_record(path: str) -> dict:
    """A step output: its path (relative to the nnU-Net root it lies in, see ``paths.portable``), size, sha256."""
    return {"path": portable(path), "bytes": os.path.getsize(path), "sha256": sha256_file(path)}


def check_manifest_format(data: dict, path: str, hint: str = "") -> None:
    """A manifest this version can read: the right format, not a newer version."""
    if data.get("format") != FORMAT:
        raise MedSeqFTError(f"{path} is not a medseqft run manifest (format {data.get('format')!r}).{hint}")
    if not isinstance(data.get("version"), int) or data["version"] > VERSION:
        raise MedSeqFTError(f"{path} has manifest version {data.get('version')!r}, newer than this nnunetv2-medseqft "
                            f"understands ({VERSION}). Upgrade the plugin to continue this run.")


def _changed(path: str, rec: dict) -> str | None:
    """How a file differs from its record (size first: the hash is read only when the size agrees), or None."""
    if not os.path.isfile(path):
        return "is missing"
    size = os.path.getsize(path)
    if size != rec["bytes"]:
        return f"changed size ({size} bytes, recorded {rec['bytes']})"
    if rec.get("sha256") and sha256_file(path) != rec["sha256"]:
        return "changed content (sha256 differs from the recorded one)"
    return None


class RunLock:
    """Exclusive lock on a run folder for the lifetime of the process (or the ``with`` block)."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, LOCK_FILE)
        self.fd = None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            self.fd = None
            raise MedSeqFTError(f"Run folder {os.path.dirname(self.path)} is in use by {holder}. Wait for it to "
                                "finish (or stop it); two processes never write one run.") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()}".encode(), 0)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class Manifest:
    def __init__(self, folder: str, data: dict):
        self.folder, self.data = folder, data

    @property
    def path(self) -> str:
        return os.path.join(self.folder, MANIFEST_FILE)

    @classmethod
    def open(cls, folder: str, name: str, settings: dict, resume_hint: str,
             stored_hint: Callable[[dict], str] | None = None) -> "Manifest":
        """The run's manifest: created for a new run, checked against ``settings`` for an existing one
        (``stored_hint``: more advice from the stored settings when they differ)."""
        path = os.path.join(folder, MANIFEST_FILE)
        if not os.path.isfile(path):
            os.makedirs(folder, exist_ok=True)
            manifest = cls(folder, {"format": FORMAT, "version": VERSION, "name": name, "created": now(),
                                    "updated": now(), "settings": settings, "steps": {}})
            manifest.save()
            return manifest
        try:
            data = read_json(path)
        except ValueError as e:
            raise MedSeqFTError(f"{path} is not valid JSON ({e}). Restore it from a backup or use another --name.") \
                from e
        check_manifest_format(data, path, " Use another --name.")
        diff = sorted(k for k in set(settings) | set(data["settings"]) if settings.get(k) != data["settings"].get(k))
        if diff:
            lines = "\n".join(f"  {k}: stored {data['settings'].get(k)!r}, now {settings.get(k)!r}" for k in diff)
            more = stored_hint(data["settings"]) if stored_hint else ""
            raise MedSeqFTError(f"Run '{name}' exists with other settings:\n{lines}\nResume it with its own settings "
                                f"({data.get('command') or resume_hint}{more}) or choose another --name. Results "
                                "are never mixed.")
        return cls(folder, data)

    def save(self) -> None:
        self.data["updated"] = now()
        write_json_atomic(self.data, self.path)

    # ---------------------------------------------------------------- steps
    def step(self, key: str) -> dict | None:
        return self.data["steps"].get(key)

    def is_done(self, key: str) -> bool:
        record = self.step(key)
        return bool(record) and record["status"] == "done"

    def check_done_outputs(self, key: str) -> None:
        """A done step's files must still be there, unchanged (size, then sha256): never silently build on a
        changed file or redo finished work."""
        for label, rec in (self.step(key).get("outputs") or {}).items():
            if not (isinstance(rec, dict) and "bytes" in rec):  # files that later steps append to carry no size
                continue
            path = resolved(rec["path"])
            problem = _changed(path, rec)
            if problem:
                raise MedSeqFTError(f"Step '{key}' is done but its output {label} ({path}) {problem}. Restore the "
                                    "file, or start a new run with another --name.")

    def start(self, key: str, info: dict) -> float:
        previous = self.step(key) or {}
        self.data["steps"][key] = {**info, "status": "running", "started": now(), "attempts":
                                   previous.get("attempts", 0) + 1}
        self.save()
        return time.time()

    def finish(self, key: str, started: float, outputs: dict) -> None:
        self.data["steps"][key].update(status="done", finished=now(), seconds=round(time.time() - started, 1),
                                       outputs=outputs)
        self.data["steps"][key].pop("error", None)
        self.save()

    def fail(self, key: str, started: float, error: str) -> None:
        self.data["steps"][key].update(status="failed", finished=now(), seconds=round(time.time() - started, 1),
                                       error=error)
        self.save()
