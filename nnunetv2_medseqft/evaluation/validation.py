"""Scores of task models on their fold's validation cases: Dice and HD95 per label, the R matrix.

Predictions run in-process with nnU-Net's own predictor (tiles batched on CPU: ``sliding_window``) on the
preprocessed validation cases and are resampled to the original geometry with nnU-Net's export code, then
compared with the dataset's ``gt_segmentations`` (what ``nnUNetv2_train``'s final validation does). HD95 is
MONAI's ``compute_hausdorff_distance`` (percentile 95, voxel spacing in mm). Empty masks: a label absent from
both prediction and ground truth of a case is not scored for that case (nnU-Net's convention); one
empty -> Dice 0, HD95 = the image diagonal in mm (a finite penalty, so means stay defined). Dice is reported in points (0-100). Test-time mirroring is off by
default (8x cheaper in 3D; nnU-Net's own ``validation/summary.json`` keeps it). Weights scored before on the same
validation set are not predicted again (``score_cache.py``).

The R matrix (METHOD.md): R[i][j] is the Dice on task j of the body after step i with task j's own
segmentation head (row 0: the foundation's body). ACC = mean of the last row; BWT = mean over j < T of
R[T][j] - R[j][j]; FWT = mean over j >= 2 of R[j-1][j] - R[0][j] (the body before task j against the
foundation's body, both with task j's head, which was trained on a later body: indicative only; the
unseen-task transfer is the direct measure).
"""

from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from importlib.metadata import version

import numpy as np
import torch

from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.evaluation.metrics import dice_and_hd95, summarise
from nnunetv2_medseqft.evaluation.score_cache import ScoreCache


def overlay_slice(image: np.ndarray, gt: np.ndarray, pred: np.ndarray) -> dict:
    """The axial slice (numpy axis 0) with the most ground-truth foreground, of image, ground truth and prediction."""
    z = int(np.argmax((gt > 0).reshape(gt.shape[0], -1).sum(1)))
    return {"image": image[z].astype(np.float32), "gt": gt[z].astype(np.uint8), "pred": pred[z].astype(np.uint8),
            "slice": z}


@dataclass
class ValidationSet:
    """One dataset's fold validation cases, loaded once, plus the network that predicts them."""

    dataset_name: str
    labels: dict[str, int]  # label name -> value (background excluded)
    cases: list[tuple[str, np.ndarray, dict, np.ndarray]]  # (id, preprocessed data, properties, ground truth)
    predictor: object
    raw_images: dict[str, str]  # case id -> first channel's raw image file (for overlay figures)
    cache: ScoreCache | None = None  # weights scored before are not predicted again (score_cache.py)

    @classmethod
    def load(cls, dataset_name: str, plans_name: str, configuration: str, fold, device: str = "cpu",
             mirror: bool = False, model_dataset_json: dict | None = None) -> "ValidationSet":
        """``model_dataset_json``: the labels the model predicts, when they are not this dataset's (multitask)."""
        from batchgenerators.utilities.file_and_folder_operations import load_json
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        from nnunetv2_medseqft.evaluation.sliding_window import TileBatchPredictor
        from nnunetv2_medseqft.paths import fold_split, preprocessed_root

        folder = os.path.join(preprocessed_root(), dataset_name)
        plans_file = os.path.join(folder, f"{plans_name}.json")
        if not os.path.isfile(plans_file):
            raise MedSeqFTError(f"No plans {plans_file}: plan {dataset_name} first (medseqft plan).")
        plans_manager = PlansManager(plans_file)
        dataset_json = load_json(os.path.join(folder, "dataset.json"))
        cfg = plans_manager.get_configuration(configuration)
        model_json = model_dataset_json or dataset_json
        label_manager = plans_manager.get_label_manager(model_json)
        labels = {}
        for name, value in dataset_json["labels"].items():
            if name == "ignore" or value == 0:
                continue
            if not isinstance(value, int):
                raise MedSeqFTError(f"{dataset_name}: label '{name}' is a region {value}; region-based datasets are "
                                    "not supported by medseqft evaluate (use integer labels).")
            labels[name] = value
        data_folder = os.path.join(folder, cfg.data_identifier)
        _, val = fold_split(folder, data_folder, fold, log=lambda *a: None)
        dataset = infer_dataset_class(data_folder)(data_folder, identifiers=val)
        reader = plans_manager.image_reader_writer_class()
        cases = []
        for key in val:
            data, _, _, properties = dataset.load_case(key)
            gt, _ = reader.read_seg(os.path.join(folder, "gt_segmentations", key + dataset_json["file_ending"]))
            cases.append((key, np.asarray(data), properties, np.asarray(gt[0])))
        network = nnUNetTrainer.build_network_architecture(plans_manager, cfg, len(dataset_json["channel_names"]),
                                                           label_manager.num_segmentation_heads,
                                                           enable_deep_supervision=False)
        tile_step_size, use_gaussian = 0.5, True
        with contextlib.redirect_stdout(io.StringIO()):  # its CPU notice is noise here
            predictor = TileBatchPredictor(tile_step_size=tile_step_size, use_gaussian=use_gaussian, use_mirroring=mirror,
                                           perform_everything_on_device=device != "cpu", device=torch.device(device),
                                           verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        mirror_axes = tuple(range(len(cfg.patch_size))) if mirror else None
        predictor.manual_initialization(network.to(device), plans_manager, cfg, None, model_json, "nnUNetTrainer",
                                        mirror_axes)
        from nnunetv2.paths import nnUNet_raw

        raw_images = {key: os.path.join(nnUNet_raw or "", dataset_name, "imagesTr", f"{key}_0000{dataset_json['file_ending']}")
                      for key in val}
        cache = ScoreCache(folder, {
            "dataset": dataset_name, "configuration": cfg.configuration, "model_labels": model_json["labels"],
            "cases": ScoreCache.case_stamps(data_folder, os.path.join(folder, "gt_segmentations"),
                                            dataset_json["file_ending"], val),
            "mirror": mirror, "tile_step_size": tile_step_size, "use_gaussian": use_gaussian,
            "device": torch.device(device).type, "nnunetv2": version("nnunetv2")})
        return cls(dataset_name, labels, cases, predictor, raw_images, cache)

    def score(self, state_dict: dict, label_map: dict[int, int] | None = None, overlay: str | None = None) -> dict:
        """Scores of one set of weights; ``label_map`` maps predicted values to this dataset's (multitask).

        ``overlay``: also write the first validation case's most-foreground axial slice (raw image, ground
        truth, prediction) to this ``.npz`` file, for the report's figures; skipped if the raw image is gone."""
        from nnunetv2.inference.export_prediction import (
            convert_predicted_logits_to_segmentation_with_correct_shape,
        )

        key = self.cache.key(state_dict, label_map) if self.cache else None
        if key and (kept := self.cache.get(key, overlay)) is not None:
            return kept
        p = self.predictor
        p.list_of_parameters = [state_dict]
        per_case = []
        for n, (case, data, properties, gt) in enumerate(self.cases):
            logits = p.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()
            seg = convert_predicted_logits_to_segmentation_with_correct_shape(
                logits, p.plans_manager, p.configuration_manager, p.label_manager, properties)
            seg = np.asarray(seg)
            if label_map is not None:
                seg = np.vectorize(lambda v: label_map.get(int(v), 0), otypes=[gt.dtype])(seg)
            spacing = properties["spacing"]
            per_case.append({name: dice_and_hd95(seg == value, gt == value, spacing)
                             for name, value in self.labels.items()})
            if overlay and n == 0 and os.path.isfile(self.raw_images[case]):
                self._write_overlay(overlay, case, seg, gt)
        scores = summarise(per_case, [c[0] for c in self.cases])
        if key:
            self.cache.put(key, scores, overlay)
        return scores

    def _write_overlay(self, path: str, key: str, seg: np.ndarray, gt: np.ndarray) -> None:
        import SimpleITK as sitk

        image = sitk.GetArrayFromImage(sitk.ReadImage(self.raw_images[key]))
        if image.shape != gt.shape:  # another geometry than the exported segmentation: no figure rather than a wrong one
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez_compressed(tmp, case=key, **overlay_slice(image, gt, seg))
        os.replace(tmp, path)


def load_weights(path: str) -> dict:
    from nnunetv2_medseqft.checkpoints import load_checkpoint_file

    return load_checkpoint_file(path, what="model")["network_weights"]


def training_curves(checkpoint_path: str) -> dict:
    """Per-epoch curves nnU-Net logged in a checkpoint, and where stage B began (MedSeqFT trainers)."""
    from nnunetv2_medseqft.checkpoints import load_checkpoint_file

    ckpt = load_checkpoint_file(checkpoint_path, what="model")
    log = ckpt.get("logging", {})
    section = ckpt.get("medseqft", {})
    stage_a, epochs = section.get("stage_a_epochs"), section.get("num_epochs")
    stage_b = stage_a if stage_a is not None and epochs is not None and stage_a < epochs else None
    return {"train_losses": [float(v) for v in log.get("train_losses", [])],
            "val_losses": [float(v) for v in log.get("val_losses", [])],
            "ema_fg_dice": [float(v) for v in log.get("ema_fg_dice", [])],
            "stage_b_start": stage_b}
