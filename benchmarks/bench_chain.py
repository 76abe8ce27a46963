"""Chain-pack benchmark (on demand, not in CI): size of a pack against the full checkpoints, exactness of unpack.

1. Measured: a real tiny 2-task ``medseqft run`` (built in --workdir, reusing what exists: synth data, planned
   pool, tiny foundation, the run itself, which resumes), packed with ``medseqft chain pack`` and unpacked;
   every rebuilt ``checkpoint_final.pth`` is compared weight by weight with the original, and both are loaded
   by nnU-Net's predictor (a model folder each) to predict one preprocessed validation case.
2. Extrapolated to 10 tasks from exact byte counts: nnU-Net's default 3d_fullres CT network (PlainConvUNet,
   6 stages, 32..320 features, 3x3x3 kernels, 2 convs per stage, deep supervision; 1 input channel,
   2 classes) with peft LoRA rank --rank on ``.*(stages|stem).*\\.conv`` (the MedSeqFTTrainer default). A task's
   pack part = its LoRA factors + trained norms/head written as the pack writes them + its index entry
   (the tiny run's entry with the network's key lists and logging of 1000 epochs); a task's full
   checkpoint = ``torch.save`` of what MedSeqFTTrainer writes (merged weights, stage-B SGD momentum of the
   trainable parameters, the same non-weight parts). The foundation is in neither (the user keeps it).

The LAST line printed is a JSON object with (at least) these keys:
  pack_size_ratio_10_tasks   extrapolated pack bytes / sum of checkpoint_final.pth bytes, 10 tasks, default net
  unpack_max_abs_diff        largest |weight difference| of a rebuilt checkpoint against its original (tiny run)

Reduced CPU run: ``python benchmarks/bench_chain.py --workdir /tmp/chain_bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_mds import BIN, build_foundation, set_env  # noqa: E402

RUN_ARGS = ["--epochs", "4", "--iterations", "3", "--val-iterations", "1", "--rft", "stage_b_fraction=0.5",
            "lora_rank=4", "--mds", "repeats=8"]
EPOCHS = 1000  # nnU-Net's default training length: the size of the logging a real task checkpoint carries


def model_folder_for(ckpt_path: str, folder: Path) -> Path:
    """An nnU-Net model folder (plans.json, dataset.json, fold_F/) around a checkpoint, for the predictor."""
    import torch

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    args = ckpt["init_args"]
    fold = folder / f"fold_{args['fold']}"
    fold.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(args["plans"]))
    (folder / "dataset.json").write_text(json.dumps(args["dataset_json"]))
    target = fold / "checkpoint_final.pth"
    if not target.exists():
        target.symlink_to(os.path.abspath(ckpt_path))
    return folder


def predict_logits(model_folder: Path, fold, data):
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_folder), (fold,), "checkpoint_final.pth")
    return predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()


def measured(args, workdir: Path, foundation: Path) -> dict:
    """Pack and unpack the tiny run; exactness and sizes."""
    import numpy as np
    import torch
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from nnunetv2_medseqft.paths import fold_split
    from nnunetv2_medseqft.reports.chain_pack import pack_run, same, unpack

    cmd = [str(BIN / "medseqft"), "run", "--foundation", str(foundation), "--datasets", "501", "502", "--method",
           "medseqft", "--name", args.name, *RUN_ARGS]
    print("+", " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"medseqft run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    run_seconds = time.time() - t0
    manifest = json.loads((workdir / "nnUNet_results" / "medseqft_runs" / args.name / "manifest.json").read_text())

    t0 = time.time()
    index = pack_run(args.name, str(workdir / "pack"), force=True, log=print)
    pack_seconds = time.time() - t0
    fft_index = pack_run(args.name, str(workdir / "pack_fft"), with_fft=True, force=True, log=lambda *a: None)
    t0 = time.time()
    summary = unpack(str(workdir / "pack"), str(foundation), str(workdir / "unpacked"), log=print)
    unpack_seconds = time.time() - t0

    diffs, pred_diffs, meta_equal = [], [], True
    for dataset, rec in summary["tasks"].items():
        original_path = manifest["steps"][f"train/{dataset}"]["outputs"]["model"]["path"]
        a = torch.load(rec["checkpoint_final"], map_location="cpu", weights_only=False)
        b = torch.load(original_path, map_location="cpu", weights_only=False)
        assert list(a) == list(b) and list(a["network_weights"]) == list(b["network_weights"]), dataset
        diffs.append(max((a["network_weights"][k] - v).abs().max().item() for k, v in b["network_weights"].items()))
        meta_equal &= all(same(a[k], b[k]) for k in a if k not in ("network_weights", "optimizer_state"))
        # nnU-Net's predictor, from a model folder each, on the first validation case of the fold
        pre = workdir / "nnUNet_preprocessed" / dataset
        plans = b["init_args"]["plans"]
        data_folder = pre / plans["configurations"][b["init_args"]["configuration"]]["data_identifier"]
        _, val = fold_split(str(pre), str(data_folder), b["init_args"]["fold"], log=lambda *a: None)
        data = np.asarray(infer_dataset_class(str(data_folder))(str(data_folder), identifiers=val[:1])
                          .load_case(val[0])[0], dtype=np.float32)
        fold = b["init_args"]["fold"]
        la = predict_logits(model_folder_for(rec["checkpoint_final"], workdir / "predict" / f"unpacked_{dataset}"),
                            fold, data)
        lb = predict_logits(Path(original_path).parent.parent, fold, data)
        pred_diffs.append((la - lb).abs().max().item())
    ckpt_bytes = index["checkpoint_bytes"]
    entries = [len(json.dumps(e, separators=(",", ":"))) for e in index["entries"]]
    files = [sum(f["bytes"] for f in e["files"].values()) for e in index["entries"]]
    header = index["pack_bytes"] - sum(entries) - sum(files)  # index fields shared by all tasks
    per_task_pack = (sum(entries) + sum(files)) / len(files)
    per_task_ckpt = ckpt_bytes / len(files)
    return {"run_seconds": round(run_seconds, 1), "pack_seconds": round(pack_seconds, 2),
            "unpack_seconds": round(unpack_seconds, 2), "tiny_pack_bytes": index["pack_bytes"],
            "tiny_checkpoint_bytes": ckpt_bytes, "tiny_pack_ratio_2_tasks": index["pack_bytes"] / ckpt_bytes,
            "tiny_pack_with_fft_ratio_2_tasks": fft_index["pack_bytes"] / ckpt_bytes,
            "tiny_ratio_10_tasks": (header + 10 * per_task_pack) / (10 * per_task_ckpt),
            "tiny_per_task_pack_bytes": per_task_pack, "tiny_per_task_checkpoint_bytes": per_task_ckpt,
            "unpack_max_abs_diff": max(diffs), "predict_max_abs_diff": max(pred_diffs),
            "unpacked_non_weight_parts_equal": bool(meta_equal), "storage": [e["storage"] for e in index["entries"]],
            "index": index}


def default_network():
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    return PlainConvUNet(1, 6, [32, 64, 128, 256, 320, 320], torch.nn.Conv3d, 3, [1, 2, 2, 2, 2, 2], 2, 2, [2] * 5,
                         True, torch.nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None, torch.nn.LeakyReLU,
                         {"inplace": True}, deep_supervision=True)


def long_logging(logging: dict, epochs: int) -> dict:
    """The tiny run's per-epoch lists stretched to ``epochs`` entries (same value types)."""
    return {k: [v[i % len(v)] for i in range(epochs)] if isinstance(v, list) and v else v for k, v in logging.items()}


def extrapolated(tiny_index: dict, rank: int, tasks: int = 10) -> dict:
    """Exact bytes of one task's pack part and full checkpoint for nnU-Net's default 3d_fullres CT network."""
    import torch
    from safetensors.torch import load_file

    from nnunetv2_medseqft import adapters as lora
    from nnunetv2_medseqft.method.settings import RFTSettings
    from nnunetv2_medseqft.reports.chain_pack import _save_safetensors, decode, dedup, encode

    net = default_network()
    n_params = sum(p.numel() for p in net.parameters())
    student = lora.add_lora(net, rank, 16.0, RFTSettings().lora_targets)  # the default alpha and targets
    n_lora = sum(p.numel() for n, p in student.named_parameters() if "lora_" in n)
    n_trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    with torch.no_grad():  # a trained adapter: B != 0 (peft starts it at 0), norms/head moved
        for p in student.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 1e-3)
    entry = json.loads(json.dumps(tiny_index["entries"][0]))
    meta = decode(entry["checkpoint"])
    meta["logging"] = long_logging(meta["logging"], EPOCHS)
    with tempfile.TemporaryDirectory(prefix="bench-chain-") as tmp:
        lora.save_adapter(student, os.path.join(tmp, "adapter"))
        adapter_state = load_file(os.path.join(tmp, "adapter", "adapter_model.safetensors"))
        unique, aliases = dedup(adapter_state)
        files = {"adapter": _save_safetensors(unique, os.path.join(tmp, "a.safetensors")),
                 "extras": _save_safetensors(load_file(os.path.join(tmp, "adapter", lora.TRAINED_EXTRAS_FILE)),
                                             os.path.join(tmp, "e.safetensors"))}
        adapter_config = json.loads(open(os.path.join(tmp, "adapter", "adapter_config.json")).read())
        # the full checkpoint as MedSeqFTTrainer writes it: merged weights + stage-B SGD momentum + meta
        optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], 1e-2, momentum=0.99,
                                    nesterov=True)
        for p in student.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer_state = optimizer.state_dict()
        merged = lora.merge(student)
        weights = merged.state_dict()
        ckpt_path = os.path.join(tmp, "checkpoint_final.pth")
        torch.save({"network_weights": weights, "optimizer_state": optimizer_state, **meta}, ckpt_path)
        ckpt_bytes = os.path.getsize(ckpt_path)
        weights_path = os.path.join(tmp, "weights.pth")
        torch.save(weights, weights_path)
        weights_bytes = os.path.getsize(weights_path)
    entry.update(checkpoint=encode(meta), adapter_config=adapter_config, adapter_aliases=aliases,
                 adapter_keys=list(adapter_state), files=files)
    entry_bytes = len(json.dumps(entry, separators=(",", ":")))
    # the whole index of a 10-task pack, as pack_run writes it (compact JSON)
    index = {k: v for k, v in tiny_index.items() if k not in ("entries", "path", "pack_bytes")}
    names = [f"Dataset{601 + i}_Task{i + 1}" for i in range(tasks)]
    entries = [{**entry, "dataset": name} for name in names]
    index.update(tasks=names, weight_keys=list(weights), entries=entries,
                 checkpoint_bytes=tasks * ckpt_bytes)
    index_bytes = len(json.dumps(index, separators=(",", ":")).encode())
    per_task_pack = entry_bytes + sum(f["bytes"] for f in files.values())
    pack_bytes = index_bytes + tasks * sum(f["bytes"] for f in files.values())
    return {"default_net_params": n_params, "default_net_lora_params": n_lora,
            "default_net_trainable_stage_b_params": n_trainable,
            "per_task_adapter_bytes": files["adapter"]["bytes"], "per_task_norms_head_bytes": files["extras"]["bytes"],
            "per_task_index_entry_bytes": entry_bytes, "per_task_pack_bytes": per_task_pack,
            "per_task_checkpoint_bytes": ckpt_bytes, "per_task_weights_only_bytes": weights_bytes,
            "pack_bytes_10_tasks": pack_bytes, "checkpoint_bytes_10_tasks": tasks * ckpt_bytes,
            "pack_size_ratio_10_tasks": pack_bytes / (tasks * ckpt_bytes),
            "pack_size_ratio_10_tasks_vs_weights_only": pack_bytes / (tasks * weights_bytes)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=None, help="folder for data and models (default: a temporary folder)")
    p.add_argument("--scale", default="tiny", help="nnunetv2_medseqft/scales.py (default tiny)")
    p.add_argument("--name", default="b-chain", help="run name (default b-chain)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank for the default network (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = p.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_chain_")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    set_env(workdir)
    foundation = build_foundation(workdir, args.scale, args.device, args.seed).resolve()
    tiny = measured(args, workdir, foundation)
    index = tiny.pop("index")
    big = extrapolated(index, args.rank)
    print(f"tiny run ({len(index['entries'])} tasks, LoRA r=4, 4-stage 32..256 net): pack "
          f"{tiny['tiny_pack_bytes']:,} B vs checkpoint_final.pth {tiny['tiny_checkpoint_bytes']:,} B -> ratio "
          f"{tiny['tiny_pack_ratio_2_tasks']:.4f} (with F_t: {tiny['tiny_pack_with_fft_ratio_2_tasks']:.3f}); "
          f"10 tasks: {tiny['tiny_ratio_10_tasks']:.4f}")
    print(f"unpack: max |weight diff| {tiny['unpack_max_abs_diff']:.1e}, max |logit diff| (nnU-Net predictor) "
          f"{tiny['predict_max_abs_diff']:.1e}, non-weight parts equal: {tiny['unpacked_non_weight_parts_equal']}; "
          f"pack {tiny['pack_seconds']} s, unpack {tiny['unpack_seconds']} s")
    print(f"default 3d_fullres net ({big['default_net_params']:,} params, LoRA r={args.rank}: "
          f"{big['default_net_lora_params']:,}): per task pack {big['per_task_pack_bytes']:,} B (adapter "
          f"{big['per_task_adapter_bytes']:,}, norms+head {big['per_task_norms_head_bytes']:,}, index entry "
          f"{big['per_task_index_entry_bytes']:,}) vs checkpoint {big['per_task_checkpoint_bytes']:,} B "
          f"(weights only {big['per_task_weights_only_bytes']:,}) -> 10-task ratio "
          f"{big['pack_size_ratio_10_tasks']:.4f}")
    result = {**big, **tiny, "rank": args.rank}
    (workdir / "bench_chain_result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
