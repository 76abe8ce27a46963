"""Checkpoint files and their weights: safe loading (CPU-mappable, clear errors), atomic writes, hashes
(of files and of weights), the segmentation head / body split, and the trainer mixin that writes nnU-Net
checkpoints with a ``medseqft`` provenance section."""

from __future__ import annotations

import copy
import hashlib
import os
import pickle
import zipfile

import torch
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunetv2_medseqft.errors import MedSeqFTError

HEAD_KEY = ".seg_layers."  # nnU-Net's segmentation head: task specific, never carried from one task to the next


def is_head_key(name: str) -> bool:
    """A parameter key or module name of the segmentation head (all deep-supervision outputs)."""
    return HEAD_KEY in f".{name}."


def body_of(state: dict) -> dict:
    """The weights without the segmentation head: what the next task starts from."""
    return {k: v for k, v in state.items() if not is_head_key(k)}


def head_of(state: dict) -> dict:
    return {k: v for k, v in state.items() if is_head_key(k)}


def with_head(body: dict, head: dict) -> dict:
    """Weights of ``body`` with the segmentation head of ``head``."""
    return {**body_of(body), **head_of(head)}


ENCODER_PREFIXES = ("encoder.", "decoder.encoder.")  # dynamic_network_architectures' U-Nets: the decoder holds
# a reference to the encoder, so its weights appear under both names


def with_decoder(encoder: dict, decoder: dict) -> dict:
    """Weights of ``encoder``'s encoder with the decoder and segmentation head of ``decoder`` (same network)."""
    return {k: (encoder if k.startswith(ENCODER_PREFIXES) else decoder)[k] for k in decoder}


def state_fingerprint(state_dict: dict, include_head: bool = False) -> str:
    """Content hash of weights (ignores the task-specific segmentation head unless ``include_head``)."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        if include_head or not is_head_key(k):
            h.update(k.encode())
            h.update(state_dict[k].detach().cpu().to(torch.float32).numpy().tobytes())
    return h.hexdigest()


def verify_sha256(path: str | None, expected: str, what: str, fix: str, found: str | None = None) -> None:
    """``path`` must exist and hash to ``expected`` (a file a run, pack or plans was made with); ``found``: its
    hash if already known."""
    if not path or not os.path.isfile(path):
        raise MedSeqFTError(f"{what} ({path}) is not there. {fix} (sha256 {expected})")
    found = found or sha256_file(path)
    if found != expected:
        raise MedSeqFTError(f"{what}: {path} has sha256 {found}, but {expected} is expected. {fix}")


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_checkpoint_file(path: str, what: str = "checkpoint") -> dict:
    """Load an nnU-Net checkpoint onto the CPU (so CUDA-saved files load anywhere)."""
    if not os.path.isfile(path):
        raise MedSeqFTError(f"{what} not found: {path}. Give the path of a checkpoint_final.pth written by nnU-Net.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as e:
        raise MedSeqFTError(f"{what} {path} is unreadable or truncated ({type(e).__name__}: {e}). "
                            "Re-copy it or use another checkpoint.") from e
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt or "init_args" not in ckpt:
        raise MedSeqFTError(f"{what} {path} is not an nnU-Net v2 checkpoint (no 'network_weights'/'init_args').")
    return ckpt


def atomic_torch_save(obj, path: str) -> None:
    """Write next to the target and rename: a crash mid-write never leaves a truncated checkpoint. Tensors are
    saved from the CPU, so the file loads on any machine, also through nnU-Net's ``-pretrained_weights`` loader
    (``torch.load`` without ``map_location``)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(to_cpu(obj), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def to_cpu(obj):
    """Every tensor in a nested checkpoint structure on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(to_cpu(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def saved_devices(path: str) -> set[str]:
    """The devices a checkpoint's tensors were saved from ('cpu', 'cuda:0', ...), read without a GPU."""
    seen = set()

    def record(storage, location):
        seen.add(location)
        return storage

    torch.load(path, map_location=record, weights_only=False)
    return seen


def loadable_here(path: str, copy_folder: str) -> str:
    """``path`` if nnU-Net can load it on this machine, else a CPU copy in ``copy_folder``.

    nnU-Net's ``-pretrained_weights`` loader calls ``torch.load`` without ``map_location``: a checkpoint
    saved from a GPU fails on a machine without one. Checkpoints of this plugin are saved on the CPU;
    this covers the others (a foundation trained elsewhere)."""
    if torch.cuda.is_available() or not any(d.startswith("cuda") for d in saved_devices(path)):
        return path
    os.makedirs(copy_folder, exist_ok=True)
    out = os.path.join(copy_folder, f"{sha256_file(path)[:16]}-{os.path.basename(path)}")
    if not os.path.isfile(out):
        atomic_torch_save(load_checkpoint_file(path), out)
    return out


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers (where hooks and state_dict keys live)."""
    if isinstance(network, DDP):
        network = network.module
    if isinstance(network, OptimizedModule):
        network = network._orig_mod
    return network


def build_task_network(init_args: dict) -> torch.nn.Module:
    """The plain network of a task checkpoint (MedSeqFT task trainers use nnUNetTrainer's architecture)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(copy.deepcopy(init_args["plans"]))
    cm = pm.get_configuration(init_args["configuration"])
    n_in = determine_num_input_channels(pm, cm, init_args["dataset_json"])
    heads = pm.get_label_manager(init_args["dataset_json"]).num_segmentation_heads
    return nnUNetTrainer.build_network_architecture(pm, cm, n_in, heads, True)


class MedSeqFTCheckpointMixin:
    """For nnUNetTrainer subclasses: stock checkpoint layout + a ``medseqft`` section, written atomically.

    Stock ``nnUNetv2_predict`` and ``-pretrained_weights`` read only the stock keys, so the
    extra section costs them nothing.
    """

    def medseqft_checkpoint_section(self) -> dict:
        return {}

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        checkpoint = {
            "network_weights": unwrap(self.network).state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            "medseqft": self.medseqft_checkpoint_section(),
        }
        atomic_torch_save(checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        # nnU-Net 2.8.1 fails on dict input and maps to the trainer's device only; load via the CPU instead.
        if isinstance(filename_or_checkpoint, str):
            filename_or_checkpoint = load_checkpoint_file(filename_or_checkpoint)
        if not self.was_initialized:
            self.initialize()
        ckpt = filename_or_checkpoint
        unwrap(self.network).load_state_dict(ckpt["network_weights"])
        self.my_init_kwargs = ckpt["init_args"]
        self.current_epoch = ckpt["current_epoch"]
        self.logger.load_checkpoint(ckpt["logging"])
        self._best_ema = ckpt["_best_ema"]
        self.inference_allowed_mirroring_axes = ckpt.get("inference_allowed_mirroring_axes",
                                                         self.inference_allowed_mirroring_axes)
        self.optimizer.load_state_dict(ckpt["optimizer_state"])
        if self.grad_scaler is not None and ckpt.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(ckpt["grad_scaler_state"])
