"""``medseqft chain pack`` / ``unpack``: store a run's chain of task models as the foundation plus small deltas.

A chained run keeps one full nnU-Net checkpoint per task although M_t = merge(body of M_(t-1) + LoRA_t)
with the trained norm affines and segmentation head, so everything but the LoRA factors, norms and head
is already in M_(t-1). A pack holds exactly those parts; with the foundation M0 (given by the user, checked
by sha256) ``unpack`` replays the chain and rebuilds every ``checkpoint_final.pth``.

Pack = a folder (copy or archive it as a whole)::

    PACK/index.json                                  format, run, method, foundation sha256, task order, and
                                                     per task: dataset, storage, the checkpoint's non-weight
                                                     parts (init_args, trainer_name, logging, medseqft section
                                                     ...), the peft adapter_config, files with sha256
    PACK/tasks/NN_<dataset>/adapter_model.safetensors  LoRA factors (storage "lora"; peft's aliases dropped)
    PACK/tasks/NN_<dataset>/norms_and_head.safetensors trained norm affines + segmentation head ("lora")
    PACK/tasks/NN_<dataset>/weights.safetensors        all weights (storage "full", see below)
    PACK/tasks/NN_<dataset>/fft.safetensors            F_t (``--with-fft``; always full weights)

Storage "full": a task whose folder has no adapter (methods ``seqfft``, ``parallel``, ``multitask``) or
whose adapter does not reproduce its checkpoint stores its complete weights (not a delta: a float32
delta is as large as the weights). Such a pack is about as large as the weights; since optimizer states
are dropped it is smaller than the checkpoints themselves (size ratio ~0.5 for FFT checkpoints).

What an unpacked checkpoint differs in: ``optimizer_state`` is None (a pack is for inference and as a
start model, ``-pretrained_weights``; not for resuming a training with ``--c``). Every other key is
restored, ``network_weights`` with the same keys, order and shared tensors. ``pack`` replays the chain
from the pack before it finishes and records the largest weight difference it saw.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import numpy as np
import torch

from nnunetv2_medseqft.checkpoints import (
    atomic_torch_save,
    body_of,
    build_task_network,
    head_of,
    load_checkpoint_file,
    sha256_file,
    state_fingerprint,
    verify_sha256,
)
from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.jsonio import read_json
from nnunetv2_medseqft.sequence.run_record import read_run, run_foundation, task_models

FORMAT = "medseqft-chain-pack"
VERSION = 1
INDEX_FILE = "index.json"
TASKS_FOLDER = "tasks"
ADAPTER_FILE = "adapter_model.safetensors"  # the names of a task's adapter/ files (adapters.model)
EXTRAS_FILE = "norms_and_head.safetensors"
WEIGHTS_FILE = "weights.safetensors"
FFT_FILE = "fft.safetensors"
DROPPED_KEYS = ("optimizer_state",)  # as large as the trainable weights; only --c needs it
TOLERANCE = 1e-6  # largest weight difference a pack may introduce (peft's merge on another machine)
_TAG = "__medseqft_type__"


# ---------------------------------------------------------------- non-weight parts as JSON

def encode(obj, where: str = "checkpoint"):
    """JSON-able form of a checkpoint's non-weight parts, restoring Python/numpy/torch types exactly.

    nnU-Net's logging holds numpy scalars, ``init_args`` a ``torch.device``, the mirroring axes a tuple;
    lists of numpy scalars of one dtype are stored compactly (the per-epoch curves)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and _TAG not in obj:
            return {k: encode(v, f"{where}.{k}") for k, v in obj.items()}
        return {_TAG: "dict", "items": [[encode(k, where), encode(v, f"{where}[{k!r}]")] for k, v in obj.items()]}
    if isinstance(obj, list):
        if obj and all(isinstance(v, np.generic) for v in obj) and len({v.dtype.str for v in obj}) == 1:
            return {_TAG: "numpy-list", "dtype": obj[0].dtype.str, "values": [v.item() for v in obj]}
        return [encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return {_TAG: "tuple", "items": [encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, torch.device):
        return {_TAG: "torch.device", "value": str(obj)}
    if isinstance(obj, np.generic):
        return {_TAG: "numpy", "dtype": obj.dtype.str, "value": obj.item()}
    if isinstance(obj, np.ndarray) and obj.size <= 4096:
        return {_TAG: "ndarray", "dtype": obj.dtype.str, "shape": list(obj.shape), "values": obj.ravel().tolist()}
    if isinstance(obj, torch.Tensor) and obj.numel() <= 4096:
        return {_TAG: "tensor", "dtype": str(obj.dtype).removeprefix("torch."), "shape": list(obj.shape),
                "values": obj.detach().cpu().reshape(-1).tolist()}
    raise MedSeqFTError(f"Cannot store {where} ({type(obj).__name__}) in a chain pack's index. "
                        "Remove it from the checkpoint or report this as a bug.")


def decode(obj):
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    kind = obj.get(_TAG)
    if kind is None:
        return {k: decode(v) for k, v in obj.items()}
    if kind == "dict":
        return {decode(k): decode(v) for k, v in obj["items"]}
    if kind == "numpy-list":
        return [np.dtype(obj["dtype"]).type(v) for v in obj["values"]]
    if kind == "tuple":
        return tuple(decode(v) for v in obj["items"])
    if kind == "torch.device":
        return torch.device(obj["value"])
    if kind == "numpy":
        return np.dtype(obj["dtype"]).type(obj["value"])
    if kind == "ndarray":
        return np.asarray(obj["values"], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"])
    if kind == "tensor":
        return torch.tensor(obj["values"], dtype=getattr(torch, obj["dtype"])).reshape(obj["shape"])
    raise MedSeqFTError(f"Unknown value type {kind!r} in a chain pack: made by a newer nnunetv2-medseqft?")


def same(a, b) -> bool:
    """Deep equality that treats NaN as equal to NaN and compares types (what a round trip must keep)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    if isinstance(a, (float, np.floating)) and a != a:
        return b != b
    return bool(a == b)


def checkpoint_meta(ckpt: dict) -> dict:
    """Everything of an nnU-Net checkpoint except the weights and the dropped optimizer state."""
    meta = {k: v for k, v in ckpt.items() if k != "network_weights" and k not in DROPPED_KEYS}
    if isinstance(meta.get("medseqft"), dict) and "student_state" in meta["medseqft"]:
        meta["medseqft"] = {k: v for k, v in meta["medseqft"].items() if k != "student_state"}  # --c state only
    return meta


# ---------------------------------------------------------------- weights

def _tensor_digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    h = hashlib.sha1(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def dedup(state: dict) -> tuple[dict, dict]:
    """(unique tensors, alias -> kept key). nnU-Net's state_dict lists the encoder twice (``encoder.*`` and
    ``decoder.encoder.*``) and peft's adapter file stores both copies; equal tensors are kept once."""
    seen, unique, aliases = {}, {}, {}
    for key, value in state.items():
        digest = _tensor_digest(value)
        if digest in seen:
            aliases[key] = seen[digest]
        else:
            seen[digest] = key
            unique[key] = value.detach().cpu().contiguous()
    return unique, aliases


def expand(unique: dict, aliases: dict, order: list[str]) -> dict:
    """Inverse of ``dedup``: aliases share the kept tensor, as in the network's own state_dict."""
    out = {}
    for key in order:
        source = aliases.get(key, key)
        if source not in unique:
            raise MedSeqFTError(f"Chain pack weights lack {source!r}: the pack is damaged; re-pack the run.")
        out[key] = unique[source]
    return out


def _save_safetensors(state: dict, path: str) -> dict:
    from safetensors.torch import save_file

    save_file(state, path)
    return {"file": os.path.basename(path), "bytes": os.path.getsize(path), "sha256": sha256_file(path)}


def max_abs_diff(a: dict, b: dict) -> float:
    if list(a) != list(b):
        missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise MedSeqFTError(f"Rebuilt weights have other keys (missing {missing[:3]}, extra {extra[:3]}).")
    return max(((a[k].float() - b[k].float()).abs().max().item() if a[k].numel() else 0.0) for k in a)


def merge_adapter(init_args: dict, base_body: dict, adapter_config: dict, adapter_state: dict, extras: dict) -> dict:
    """M_t from the body of M_(t-1), the peft adapter and the trained norms/head (what the trainer merged)."""
    network = build_task_network(init_args)
    try:
        network.load_state_dict({**base_body, **head_of(extras)})
    except RuntimeError as e:
        raise MedSeqFTError(f"The previous model's body and this task's head do not fit the task's network: {e}") from e
    from nnunetv2_medseqft import adapters  # peft: only when an adapter is rebuilt

    return adapters.merged_from_files(network, adapter_config, adapter_state, extras)


# ---------------------------------------------------------------- the run's task models

def _load_safetensors(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


# ---------------------------------------------------------------- pack

def pack_run(run: str, out: str | None = None, with_fft: bool = False, foundation: str | None = None,
             force: bool = False, log=print) -> dict:
    """Write the pack of a finished run; returns its index (with sizes and the verification result)."""
    started = time.time()
    folder, manifest = read_run(run)
    expected = manifest["settings"]["foundation_sha256"]
    foundation = run_foundation(manifest, foundation)
    out = os.path.abspath(out or os.path.join(folder, "chain_pack"))
    if os.path.exists(out):
        if not force:
            raise MedSeqFTError(f"{out} exists: choose another --out or pass --force to replace it.")
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, TASKS_FOLDER))
    try:
        index = _pack_into(tmp, manifest, foundation, expected, with_fft, log)
        index["pack_seconds"] = round(time.time() - started, 2)
        write_json_compact(index, os.path.join(tmp, INDEX_FILE))
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    index["path"] = out
    index["pack_bytes"] = folder_bytes(out)
    return index


def write_json_compact(obj, path: str) -> None:
    """The index without indentation: per-epoch logging of 10 tasks x 1000 epochs would triple in size."""
    with open(path, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def _pack_into(tmp: str, manifest: dict, foundation: str, foundation_sha: str, with_fft: bool, log) -> dict:
    m0 = body_of(load_checkpoint_file(foundation, what="foundation")["network_weights"])
    bodies = {"foundation": m0}  # the bodies a later task may start from, as the pack rebuilds them
    fingerprints = {state_fingerprint(m0): "foundation"}
    entries, weight_keys, worst, checkpoint_bytes = [], None, 0.0, 0
    for i, (dataset, path) in enumerate(task_models(manifest)):
        ckpt = load_checkpoint_file(path, what=f"task model of {dataset}")
        checkpoint_bytes += os.path.getsize(path)
        original = ckpt["network_weights"]
        keys = list(original)
        weight_keys = weight_keys or keys
        task_dir = os.path.join(TASKS_FOLDER, f"{i:02d}_{dataset}")
        os.makedirs(os.path.join(tmp, task_dir))
        meta = checkpoint_meta(ckpt)
        encoded = encode(meta)
        if not same(decode(json.loads(json.dumps(encoded))), meta):
            raise MedSeqFTError(f"The non-weight parts of {path} do not survive a JSON round trip: report this bug.")
        entry = {"dataset": dataset, "source": {"path": path, "sha256": sha256_file(path)},
                 "dropped": [k for k in DROPPED_KEYS if k in ckpt], "checkpoint": encoded,
                 "weight_keys": None if keys == weight_keys else keys}
        rebuilt, why = _pack_adapter(tmp, task_dir, entry, os.path.dirname(path), ckpt, bodies, fingerprints)
        if rebuilt is not None:
            diff = max_abs_diff(rebuilt, original)
            if diff > TOLERANCE:
                rebuilt, why = None, f"the adapter rebuilds it only to {diff:.2e}"
                for k in ("storage", "base", "adapter_config", "adapter_aliases", "adapter_keys", "files"):
                    entry.pop(k, None)
                shutil.rmtree(os.path.join(tmp, task_dir))
                os.makedirs(os.path.join(tmp, task_dir))
        if rebuilt is None:
            unique, aliases = dedup(original)
            entry.update(storage="full", reason=why, aliases=aliases, files={
                "weights": _save_safetensors(unique, os.path.join(tmp, task_dir, WEIGHTS_FILE))})
            rebuilt, diff = original, 0.0
        entry["max_abs_diff"] = diff
        worst = max(worst, diff)
        if with_fft:
            fft_path = os.path.join(os.path.dirname(path), "checkpoint_fft.pth")
            if os.path.isfile(fft_path):
                fft = load_checkpoint_file(fft_path, what=f"F_t of {dataset}")
                unique, aliases = dedup(fft["network_weights"])
                entry["fft"] = {"checkpoint": encode(checkpoint_meta(fft)), "aliases": aliases,
                                "weight_keys": list(fft["network_weights"]),
                                "dropped": [k for k in DROPPED_KEYS if k in fft],
                                "file": _save_safetensors(unique, os.path.join(tmp, task_dir, FFT_FILE))}
        for f in [*entry["files"].values()] + ([entry["fft"]["file"]] if "fft" in entry else []):
            f["file"] = os.path.join(task_dir, f["file"])
        key = f"task:{i}"
        bodies[key] = body_of(rebuilt)
        fingerprints[state_fingerprint(original)] = key
        entries.append(entry)
        log(f"  {dataset}: {entry['storage']}"
            + (f" (base {entry['base']})" if entry["storage"] == "lora" else f" ({entry['reason']})")
            + f", {sum(f['bytes'] for f in entry['files'].values()) / 1e6:.2f} MB, max |diff| {diff:.1e}")
    settings = manifest["settings"]
    return {"format": FORMAT, "version": VERSION, "run": manifest.get("name"), "method": settings.get("method"),
            "configuration": settings.get("configuration"), "fold": settings.get("fold"),
            "foundation_sha256": foundation_sha, "tasks": [e["dataset"] for e in entries],
            "weight_keys": weight_keys, "entries": entries, "with_fft": with_fft, "max_abs_diff": worst,
            "checkpoint_bytes": checkpoint_bytes}


def _pack_adapter(tmp, task_dir, entry, model_folder, ckpt, bodies, fingerprints):
    """Store a task as its adapter when its folder has one and its M_(t-1) is a body the pack rebuilds.
    Returns (rebuilt weights or None, why not)."""
    adapter = os.path.join(model_folder, "adapter")
    files = [os.path.join(adapter, f) for f in ("adapter_config.json", ADAPTER_FILE, EXTRAS_FILE)]
    if not all(os.path.isfile(f) for f in files):
        return None, "no adapter (a full fine-tuning method)"
    if (ckpt.get("medseqft") or {}).get("rft", {}).get("student_init") == "fft":
        return None, "its adapter is on its own F_t (rft student_init=fft), which is no body of the pack"
    previous = os.path.join(model_folder, "previous_model.pth")
    if not os.path.isfile(previous):
        return None, "no previous_model.pth to tell which model the adapter is on"
    prev = torch.load(previous, map_location="cpu", weights_only=False)
    base = fingerprints.get(prev.get("fingerprint") or state_fingerprint(prev["network_weights"]))
    if base is None:
        return None, "its previous model is neither the foundation nor an earlier task of the run"
    adapter_config = read_json(files[0])
    adapter_state = _load_safetensors(files[1])
    unique, aliases = dedup(adapter_state)
    extras = _load_safetensors(files[2])
    entry.update(storage="lora", base=base, adapter_config=adapter_config, adapter_aliases=aliases,
                 adapter_keys=list(adapter_state), files={
                     "adapter": _save_safetensors(unique, os.path.join(tmp, task_dir, ADAPTER_FILE)),
                     "extras": _save_safetensors(extras, os.path.join(tmp, task_dir, EXTRAS_FILE))})
    rebuilt = merge_adapter(ckpt["init_args"], bodies[base], adapter_config,
                            expand(unique, aliases, entry["adapter_keys"]), extras)
    order = list(ckpt["network_weights"])
    return {k: rebuilt[k] for k in order if k in rebuilt}, None


# ---------------------------------------------------------------- unpack

def read_index(pack: str) -> dict:
    path = os.path.join(pack, INDEX_FILE)
    if not os.path.isfile(path):
        raise MedSeqFTError(f"{pack} is not a chain pack ({INDEX_FILE} missing). Make one with "
                            "medseqft chain pack RUN.")
    try:
        index = read_json(path)
    except ValueError as e:
        raise MedSeqFTError(f"{path} is not valid JSON ({e}): the pack is damaged; re-pack the run.") from e
    if index.get("format") != FORMAT:
        raise MedSeqFTError(f"{path} is not a medseqft chain pack (format {index.get('format')!r}).")
    if not isinstance(index.get("version"), int) or index["version"] > VERSION:
        raise MedSeqFTError(f"{path} has pack version {index.get('version')!r}, newer than this nnunetv2-medseqft "
                            f"understands ({VERSION}). Upgrade the plugin.")
    return index


def check_pack_files(pack: str, index: dict) -> None:
    """Every task the index lists must have all its files, unchanged: a chain cannot skip a link."""
    problems = []
    for i, entry in enumerate(index["entries"]):
        files = list(entry["files"].values()) + ([entry["fft"]["file"]] if "fft" in entry else [])
        for f in files:
            path = os.path.join(pack, f["file"])
            if not os.path.isfile(path):
                problems.append(f"task {i + 1} {entry['dataset']}: {f['file']} is missing")
            elif os.path.getsize(path) != f["bytes"] or sha256_file(path) != f["sha256"]:
                problems.append(f"task {i + 1} {entry['dataset']}: {f['file']} is changed (sha256)")
    if problems:
        raise MedSeqFTError(f"Chain pack {pack} is incomplete or damaged; every later task is rebuilt from the "
                            "earlier ones, so nothing is unpacked:\n  " + "\n  ".join(problems)
                            + f"\nCopy the complete pack again or re-pack run '{index.get('run')}' "
                              "(medseqft chain pack RUN).")


def check_foundation(foundation: str, index: dict) -> None:
    verify_sha256(foundation, index["foundation_sha256"], f"The foundation of pack '{index.get('run')}'",
                  "The task models are deltas on that exact file: pass it with --foundation (check with sha256sum).")


def rebuild(pack: str, foundation: str):
    """Yield (dataset, checkpoint, F_t checkpoint or None) for each task, in chain order."""
    index = read_index(pack)
    check_foundation(foundation, index)
    check_pack_files(pack, index)
    bodies = {"foundation": body_of(load_checkpoint_file(foundation, what="foundation")["network_weights"])}
    for i, entry in enumerate(index["entries"]):
        meta = decode(entry["checkpoint"])
        keys = entry.get("weight_keys") or index["weight_keys"]
        files = {name: os.path.join(pack, f["file"]) for name, f in entry["files"].items()}
        if entry["storage"] == "lora":
            if entry["base"] not in bodies:
                raise MedSeqFTError(f"Task {entry['dataset']} starts from {entry['base']}, which the pack does not "
                                    "rebuild before it: the pack is damaged.")
            adapter = expand(_load_safetensors(files["adapter"]), entry["adapter_aliases"], entry["adapter_keys"])
            merged = merge_adapter(meta["init_args"], bodies[entry["base"]], entry["adapter_config"], adapter,
                                   _load_safetensors(files["extras"]))
            missing = [k for k in keys if k not in merged]
            if missing:
                raise MedSeqFTError(f"Rebuilt {entry['dataset']} lacks {missing[:3]}: the pack does not fit this "
                                    "nnU-Net/peft version.")
            weights = {k: merged[k] for k in keys}
        else:
            weights = expand(_load_safetensors(files["weights"]), entry["aliases"], keys)
        bodies[f"task:{i}"] = body_of(weights)
        ckpt = {"network_weights": weights, **meta}
        for k in entry.get("dropped", []):
            ckpt[k] = None
        ckpt = _restore_key_order(ckpt, meta)
        fft = None
        if "fft" in entry:
            fmeta = decode(entry["fft"]["checkpoint"])
            fft = {"network_weights": expand(_load_safetensors(os.path.join(pack, entry["fft"]["file"]["file"])),
                                             entry["fft"]["aliases"], entry["fft"]["weight_keys"]), **fmeta}
            for k in entry["fft"].get("dropped", []):
                fft[k] = None
            fft = _restore_key_order(fft, fmeta)
        yield entry["dataset"], ckpt, fft


def _restore_key_order(ckpt: dict, meta: dict) -> dict:
    """nnU-Net writes network_weights first, then optimizer_state; keep that order for identical keys."""
    order = ["network_weights"] + [k for k in ("optimizer_state",) if k in ckpt] + [k for k in meta]
    return {k: ckpt[k] for k in dict.fromkeys(order)}


def unpack(pack: str, foundation: str, out: str | None = None, log=print) -> dict:
    """Rebuild ``OUT/<dataset>/checkpoint_final.pth`` (and ``checkpoint_fft.pth`` when packed) for every task."""
    started = time.time()
    pack = os.path.abspath(pack)
    index = read_index(pack)
    out = os.path.abspath(out or f"{pack.rstrip(os.sep)}_unpacked")
    written = {}
    for dataset, ckpt, fft in rebuild(pack, foundation):
        folder = os.path.join(out, dataset)
        os.makedirs(folder, exist_ok=True)
        atomic_torch_save(ckpt, os.path.join(folder, "checkpoint_final.pth"))
        written[dataset] = {"checkpoint_final": os.path.join(folder, "checkpoint_final.pth")}
        if fft is not None:
            atomic_torch_save(fft, os.path.join(folder, "checkpoint_fft.pth"))
            written[dataset]["checkpoint_fft"] = os.path.join(folder, "checkpoint_fft.pth")
        log(f"  {dataset}: {os.path.join(folder, 'checkpoint_final.pth')}")
    return {"run": index.get("run"), "out": out, "tasks": written, "seconds": round(time.time() - started, 2)}


# ---------------------------------------------------------------- CLI

def _cmd_pack(args) -> int:
    index = pack_run(args.run, args.out, with_fft=args.with_fft, foundation=args.foundation, force=args.force)
    total = index["checkpoint_bytes"]
    print(f"pack written: {index['path']} ({index['pack_bytes'] / 1e6:.2f} MB for {len(index['tasks'])} tasks; "
          f"checkpoint_final.pth files: {total / 1e6:.2f} MB, ratio {index['pack_bytes'] / total:.3f}; "
          f"largest weight difference after replaying the chain: {index['max_abs_diff']:.1e})")
    return 0


def _cmd_unpack(args) -> int:
    summary = unpack(args.pack, args.foundation, args.out)
    print(f"unpacked {len(summary['tasks'])} task models into {summary['out']} in {summary['seconds']:.1f} s")
    return 0


def configure_parser(parser, name: str) -> None:
    sub = parser.add_subparsers(dest="chain_command", metavar="ACTION")
    sub.required = True
    p = sub.add_parser("pack", help="store a finished run's task models as LoRA factors + norms/head per task",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("run", metavar="RUN", help="run name (under $nnUNet_results/medseqft_runs) or run folder")
    p.add_argument("--out", metavar="PACK", default=None, help="pack folder (default: RUN/chain_pack)")
    p.add_argument("--with-fft", action="store_true", help="also store each F_t (checkpoint_fft.pth, full weights)")
    p.add_argument("--foundation", metavar="CKPT", default=None,
                   help="the run's foundation, if it moved since the run (default: the path in the manifest)")
    p.add_argument("--force", action="store_true", help="replace an existing pack folder")
    p.set_defaults(func=_cmd_pack)
    u = sub.add_parser("unpack", help="rebuild every task's checkpoint_final.pth from a pack and the foundation")
    u.add_argument("pack", metavar="PACK", help="pack folder written by 'medseqft chain pack'")
    u.add_argument("--foundation", metavar="CKPT", required=True,
                   help="the foundation checkpoint the run started from (checked by sha256)")
    u.add_argument("--out", metavar="DIR", default=None, help="output folder (default: PACK_unpacked)")
    u.set_defaults(func=_cmd_unpack)
