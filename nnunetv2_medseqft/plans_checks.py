"""Checks on nnU-Net plans that must fail early, with a message a user can act on."""

from nnunetv2_medseqft.errors import MedSeqFTError


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
