"""JSON files that are never left half-written: write next to the target, fsync, rename."""

from __future__ import annotations

import json
import os


def write_json_atomic(obj, path: str) -> None:
    """A crash or a full disk during the write leaves the previous file intact."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)
