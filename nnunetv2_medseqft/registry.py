"""The one list of classes this plugin exposes to nnU-Net's own look-ups.

nnU-Net finds trainers and planners by class name (``-tr NAME``, ``-pl NAME``). The shim
modules (see ``discovery.py``) resolve exactly these names, lazily, from these modules.
"""

# class name -> module that defines it (installed under the nnunetv2_medseqft namespace)
TRAINERS: dict[str, str] = {
    "MedSeqFTPretrainTrainer": "nnunetv2_medseqft.trainers.pretrain",
    "MedSeqFTPretrainTrainer_5epochs": "nnunetv2_medseqft.trainers.pretrain",
    "MedSeqFTPretrainTrainer_50epochs": "nnunetv2_medseqft.trainers.pretrain",
    "MedSeqFTPretrainTrainer_250epochs": "nnunetv2_medseqft.trainers.pretrain",
    "MedSeqFTPretrainTrainer_tiny": "nnunetv2_medseqft.trainers.pretrain",
}

PLANNERS: dict[str, str] = {
    "MedSeqFTPlanner": "nnunetv2_medseqft.planners.medseqft_planner",
}
