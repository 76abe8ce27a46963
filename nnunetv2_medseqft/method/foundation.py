"""The foundation model M0: an nnU-Net checkpoint written by MedSeqFTPretrainTrainer or ``medseqft import-nnssl``
(body + SSL head + SSL settings)."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_medseqft.checkpoints import load_checkpoint_file, sha256_file
from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.method.ssl import SSLSettings, build_ssl_network

# the architecture-defining fields of a configuration: equal in foundation and downstream plans,
# so that weights transfer unchanged
ARCHITECTURE_FIELDS = ("patch_size", "spacing", "architecture", "normalization_schemes", "use_mask_for_norm",
                       "preprocessor_name", "resampling_fn_data", "resampling_fn_data_kwargs")


@dataclass
class Foundation:
    path: str
    sha256: str
    checkpoint: dict
    ssl: SSLSettings

    @property
    def plans(self) -> dict:
        return self.checkpoint["init_args"]["plans"]

    @property
    def configuration(self) -> str:
        return self.checkpoint["init_args"]["configuration"]

    @property
    def dataset_json(self) -> dict:
        return self.checkpoint["init_args"]["dataset_json"]

    @property
    def num_input_channels(self) -> int:
        return int(self.checkpoint["medseqft"]["num_input_channels"])

    def provenance(self) -> dict:
        """What a downstream plans file / checkpoint records about its foundation."""
        section = self.checkpoint["medseqft"]
        return {"path": self.path, "sha256": self.sha256, "trainer_name": self.checkpoint["trainer_name"],
                "configuration": self.configuration, "plans_name": self.plans.get("plans_name"),
                "ssl": self.ssl.to_dict(),
                **{k: section[k] for k in ("adapted_from", "imported_from") if k in section}}

    def build_ssl_network(self, device: torch.device | str = "cpu") -> torch.nn.Module:
        """The foundation network with its reconstruction head, weights loaded, in eval mode."""
        pm = PlansManager(copy.deepcopy(self.plans))
        net = build_ssl_network(pm, pm.get_configuration(self.configuration), self.num_input_channels)
        net.load_state_dict(self.checkpoint["network_weights"])
        return net.to(device).eval()


def load_foundation(path: str) -> Foundation:
    """Load and check a foundation checkpoint. A plain segmentation checkpoint is refused: it has no SSL head."""
    path = os.path.abspath(path)
    ckpt = load_checkpoint_file(path, what="foundation checkpoint")
    section = ckpt.get("medseqft") or {}
    if "nnssl_adaptation_plan" in ckpt and not section:
        raise MedSeqFTError(f"{path} is an nnssl pre-training checkpoint: import it as a foundation first: "
                            f"medseqft import-nnssl {path} -o FOLDER, then use FOLDER/checkpoint_final.pth.")
    if section.get("role") != "foundation" or "ssl" not in section:
        raise MedSeqFTError(
            f"{path} is not a MedSeqFT foundation: it carries no SSL head/settings (trainer "
            f"'{ckpt.get('trainer_name')}'). Use a checkpoint written by MedSeqFTPretrainTrainer "
            f"(nnUNetv2_train POOL 3d_fullres all -tr MedSeqFTPretrainTrainer).")
    return Foundation(path=path, sha256=sha256_file(path), checkpoint=ckpt, ssl=SSLSettings.from_dict(section["ssl"]))


def channel_names(dataset_json: dict) -> dict:
    """{channel index (str): name} of a dataset.json (nnU-Net v2 ``channel_names``, v1 ``modality``)."""
    return dataset_json.get("channel_names") or dataset_json.get("modality") or {}


def check_channels(foundation: Foundation, dataset_json: dict, dataset_name: str) -> None:
    """Same channel count and the same normalisation per channel as the foundation's pool."""
    from nnunetv2.preprocessing.normalization.map_channel_name_to_normalization import (
        get_normalization_scheme,
    )

    ours, theirs = channel_names(dataset_json), channel_names(foundation.dataset_json)
    if len(ours) != len(theirs):
        raise MedSeqFTError(
            f"{dataset_name} has {len(ours)} input channel(s) {dict(ours)} but the foundation {foundation.path} "
            f"was pre-trained on {len(theirs)} {dict(theirs)}. Adapt its input convolution once: medseqft "
            f"adapt-foundation --foundation {foundation.path} -d {dataset_name} --channels replicate -o FOLDER, then "
            f"use FOLDER/checkpoint_final.pth as the foundation (or use one pre-trained on these channels).")
    for key in sorted(theirs, key=int):
        a, b = get_normalization_scheme(ours[key]), get_normalization_scheme(theirs[key])
        if a is not b:
            raise MedSeqFTError(
                f"Channel {key} of {dataset_name} is '{ours[key]}' ({a.__name__}) but the foundation's is "
                f"'{theirs[key]}' ({b.__name__}): the modality differs. Use a foundation pre-trained on this modality, "
                f"or, if its preprocessing is meant for this channel, make that explicit once: medseqft "
                f"adapt-foundation --foundation {foundation.path} -d {dataset_name} --normalization foundation "
                f"-o FOLDER.")



def architecture_mismatches(plans_a: dict, config_a: str, plans_b: dict, config_b: str) -> list[str]:
    """Names of architecture fields that differ between two plans' configurations (empty: weights transfer)."""
    ca = PlansManager(copy.deepcopy(plans_a)).get_configuration(config_a).configuration
    cb = PlansManager(copy.deepcopy(plans_b)).get_configuration(config_b).configuration
    return [f for f in ARCHITECTURE_FIELDS if ca.get(f) != cb.get(f)]


def describe_network(plans: dict, configuration: str) -> str:
    """'MedSeqFTCPUPlans: PlainConvUNet, features 8-64, patch 32x32x32': what a reader needs to tell two scales apart."""
    cfg = plans.get("configurations", {}).get(configuration, {})
    arch = cfg.get("architecture", {})
    features = arch.get("arch_kwargs", {}).get("features_per_stage") or [None]
    patch = "x".join(str(v) for v in cfg.get("patch_size", []))
    return (f"{plans.get('plans_name')}: {str(arch.get('network_class_name', '?')).rsplit('.', 1)[-1]}, "
            f"features {features[0]}-{features[-1]}, patch {patch}")


def require_3d_configuration(plans: dict, configuration: str, trainer_name: str) -> None:
    """MedSeqFT works on 3D patches: the configuration must exist and be 3D."""
    configs = plans.get("configurations", {})
    if configuration not in configs:
        raise MedSeqFTError(
            f"{trainer_name}: the plans '{plans.get('plans_name', '?')}' of {plans.get('dataset_name', '?')} have no "
            f"configuration '{configuration}' (available: {sorted(configs)}). MedSeqFT needs a 3D configuration: "
            f"use 3d_fullres, and if the plans lack it, check that the images are 3D and re-run "
            f"nnUNetv2_plan_and_preprocess -c 3d_fullres.")
    # resolve inheritance ('inherits_from') the way nnU-Net does, for the patch size
    cfg, seen = configs[configuration], {configuration}
    while "patch_size" not in cfg and cfg.get("inherits_from") and cfg["inherits_from"] not in seen:
        seen.add(cfg["inherits_from"])
        cfg = {**configs[cfg["inherits_from"]], **cfg, "inherits_from": configs[cfg["inherits_from"]].get("inherits_from")}
    patch = cfg.get("patch_size", [])
    if len(patch) != 3:
        raise MedSeqFTError(
            f"{trainer_name}: configuration '{configuration}' has a {len(patch)}D patch size {patch}; "
            f"MedSeqFT needs 3D patches. Use 3d_fullres.")


def recorded_foundation(plans: dict, trainer_name: str) -> dict:
    """The foundation M0 that these plans were made from (``medseqft plan`` records it), checked to be the same
    file still: its path and sha256. For what needs M0 itself during a task step (``rft g_teacher=foundation``)."""
    from nnunetv2_medseqft.paths import resolved

    record = plans.get("medseqft", {}).get("foundation") or {}
    path = resolved(record.get("path"))
    fix = (f"Put the foundation back where the plans say, or plan again with it: medseqft plan -d "
           f"{plans.get('dataset_name', 'DATASET')} --foundation FOUNDATION/checkpoint_final.pth. Nothing was trained.")
    if not path:
        raise MedSeqFTError(f"{trainer_name}: rft g_teacher=foundation needs the foundation M0, and the plans "
                            f"'{plans.get('plans_name')}' do not record one (not made by medseqft plan). {fix}")
    if not os.path.isfile(path):
        raise MedSeqFTError(f"{trainer_name}: rft g_teacher=foundation needs the foundation M0 that the plans "
                            f"record, {path}, and it is not there (moved or deleted). {fix}")
    if record.get("sha256") and sha256_file(path) != record["sha256"]:
        raise MedSeqFTError(f"{trainer_name}: rft g_teacher=foundation needs the foundation M0 that the plans "
                            f"record, and {path} has changed since (sha256 differs). {fix}")
    return {"path": path, "sha256": record.get("sha256") or sha256_file(path)}


M0_TRANSFERS = ("full", "encoder")  # what of M0 a task started from it receives; "full" is stock -pretrained_weights

# a channel whose normalised input passes its LeakyReLU for under this share of voxels is "inactive"
INACTIVE_SHARE = 0.05


def inactive_head_inputs(foundation: Foundation) -> tuple[int, int] | None:
    """(inactive, all) channels of the last decoder stage, the features a segmentation head reads, or None where
    the network has no affine norm there. After instance norm a channel's pre-activation is gamma x + beta with
    x ~ N(0, 1), positive for a share Phi(beta / |gamma|) of the voxels; below ``INACTIVE_SHARE`` it lies in
    LeakyReLU's negative slope (0.01), where a reconstruction head can read it as a linear output but a new
    segmentation head learns through it a hundred times slower. MIM pre-training leaves the last stage so
    (CPU scale: 7 of 8 channels), and a task started from M0 in full then misses small organs."""
    import re
    from statistics import NormalDist

    weights = foundation.checkpoint["network_weights"]
    norms = [k for k in weights if re.match(r"decoder\.stages\.\d+\..*norm\.weight$", k)]
    if not norms:
        return None
    last_stage = max(int(k.split(".")[2]) for k in norms)
    key = [k for k in norms if int(k.split(".")[2]) == last_stage][-1]  # the norm feeding the head
    gamma, beta = weights[key].float(), weights.get(key[:-len("weight")] + "bias")
    if beta is None:
        return None
    phi = NormalDist().cdf
    shares = [phi(float(b) / max(abs(float(g)), 1e-12)) for g, b in zip(gamma, beta.float())]
    return sum(share < INACTIVE_SHARE for share in shares), len(shares)


def start_from_foundation(foundation: Foundation, transfer: str, seed: int, out: str) -> str:
    """A task's start model derived from M0, written once to ``out`` (an nnU-Net checkpoint of M0's network):
    ``encoder``: M0's encoder and a freshly initialised decoder (nnU-Net's own init, seeded; the way nnssl fine-tunes
    its foundations), ``random``: everything freshly initialised (training from scratch on the same plans)."""
    from nnunetv2_medseqft.checkpoints import atomic_torch_save
    from nnunetv2_medseqft.trainers.pretrain import MedSeqFTPretrainTrainer

    if transfer not in ("encoder", "random"):
        raise ValueError(transfer)
    if not os.path.isfile(out):
        pm = PlansManager(copy.deepcopy(foundation.plans))
        torch.manual_seed(seed)
        channels = foundation.num_input_channels
        weights = MedSeqFTPretrainTrainer.build_network_architecture(
            pm, pm.get_configuration(foundation.configuration), channels, channels, False).state_dict()
        if transfer == "encoder":  # the decoder holds a reference to the encoder: its 'decoder.encoder.*' keys too
            weights.update({k: v for k, v in foundation.checkpoint["network_weights"].items()
                            if k.startswith(("encoder.", "decoder.encoder."))})
        ckpt = dict(foundation.checkpoint, network_weights=weights, optimizer_state=None)
        ckpt["medseqft"] = dict(ckpt["medseqft"], start_from={"foundation": foundation.sha256, "transfer": transfer,
                                                             "seed": seed})
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        atomic_torch_save(ckpt, out)
    return out
