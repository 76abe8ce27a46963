"""Running real nnU-Net commands from tests, in isolated nnU-Net folders."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent


@dataclass
class NnunetFolders:
    root: Path

    @property
    def raw(self) -> Path:
        return self.root / "nnUNet_raw"

    @property
    def preprocessed(self) -> Path:
        return self.root / "nnUNet_preprocessed"

    @property
    def results(self) -> Path:
        return self.root / "nnUNet_results"

    def env(self) -> dict:
        from nnunetv2_medseqft.plugin.discovery import shim_dir

        env = dict(os.environ)
        env.update(
            nnUNet_raw=str(self.raw), nnUNet_preprocessed=str(self.preprocessed), nnUNet_results=str(self.results),
            nnUNet_def_n_proc="2", nnUNet_n_proc_DA="2", nnUNet_compile="f", nnUNet_extTrainer=shim_dir(),
            PYTHONUNBUFFERED="1",
        )
        return env


def run(cmd: list[str], folders: NnunetFolders, check: bool = True, timeout: int = 1200) -> subprocess.CompletedProcess:
    """Run an installed console script (nnUNetv2_*, medseqft) or python; on failure show the output tail."""
    if cmd[0] != sys.executable:
        cmd = [str(BIN / cmd[0])] + list(cmd[1:])
    proc = subprocess.run(cmd, env=folders.env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def run_python(code: str, folders: NnunetFolders, check: bool = True) -> subprocess.CompletedProcess:
    """Python in a fresh process, so nnunetv2.paths reads these folders' environment variables."""
    return run([sys.executable, "-c", code], folders, check=check)


TASKS = ["501", "502"]
TINY = ["--epochs", "4", "--iterations", "3", "--val-iterations", "1", "--rft", "stage_b_fraction=0.5", "lora_rank=4",
        "--mds", "repeats=8"]


# the session's medseqft run trains each task model as an adapter on the last (student_init=previous), so that
# chain packing stores it as one; the default student (F_t + LoRA) is trained by test_medseqft_trainer's runs
PACKABLE = ("--rft", "student_init=previous")


def run_cmd(foundation, name, method, *extra):
    return ["medseqft", "run", "--foundation", str(foundation), "--datasets", *TASKS, "--method", method,
            "--name", name, *TINY, *extra]


def runner_code(cmd: list[str], run_dir: Path, body: str) -> str:
    """Python for a fresh process: the Runner that ``medseqft run`` command ``cmd`` builds over the manifest in
    ``run_dir`` (opened as the run opens it), then ``body``, which sees ``manifest`` and ``new_runner()``."""
    return f"""
from nnunetv2_medseqft.cli.main import build_parser
from nnunetv2_medseqft.sequence.manifest import Manifest
from nnunetv2_medseqft.sequence.request import request_from_args, validate
from nnunetv2_medseqft.sequence.runner import Runner
argv = {cmd[1:]!r}
args = build_parser().parse_args(argv)
args.argv = argv[1:]
request = request_from_args(args)
foundation = validate(request)
manifest = Manifest.open({str(run_dir)!r}, request.name, request.settings(foundation.sha256), "")
def new_runner():
    return Runner(request, foundation, manifest, log=lambda *a: None)
""" + body


def folder_hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def manifest(folders, name) -> dict:
    """A run's manifest with its recorded paths (``$nnUNet_results/...``) resolved against ``folders``."""
    path = folders.results / "medseqft_runs" / name / "manifest.json"
    return resolved_paths(json.loads(path.read_text()), folders) if path.is_file() else {}


def resolved_paths(data: dict, folders) -> dict:
    text = json.dumps(data)
    for var, root in (("nnUNet_results", folders.results), ("nnUNet_preprocessed", folders.preprocessed),
                      ("nnUNet_raw", folders.raw)):
        text = text.replace(f'"${var}/', f'"{root}/')
    return json.loads(text)
