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
    "MedSeqFTPretrainTrainer_cpu": "nnunetv2_medseqft.trainers.pretrain",
    "MedSeqFTPretrainTrainer_cpuDemo": "nnunetv2_medseqft.trainers.pretrain",
    "MedSeqFTTrainer": "nnunetv2_medseqft.trainers.medseqft",
    "MedSeqFTFFTTrainer": "nnunetv2_medseqft.trainers.medseqft",
    "MedSeqFTLoRATrainer": "nnunetv2_medseqft.trainers.medseqft",
    "MedSeqFTRFTTrainer": "nnunetv2_medseqft.trainers.medseqft",
    "MedSeqFTRFTTrainer_tiny": "nnunetv2_medseqft.trainers.medseqft",
    "MedSeqFTTrainer_randomBuffer": "nnunetv2_medseqft.trainers.medseqft",
    "MedSeqFTTrainer_100epochs": "nnunetv2_medseqft.trainers.medseqft",
    "MedSeqFTFFTTrainer_100epochs": "nnunetv2_medseqft.trainers.medseqft",
    "MedSeqFTLoRATrainer_100epochs": "nnunetv2_medseqft.trainers.medseqft",
    "MedSeqFTTrainer_tiny": "nnunetv2_medseqft.trainers.medseqft",
    "MedSeqFTFFTTrainer_tiny": "nnunetv2_medseqft.trainers.medseqft",
    "MedSeqFTLoRATrainer_tiny": "nnunetv2_medseqft.trainers.medseqft",
    "MedSeqFTTrainer_randomBuffer_tiny": "nnunetv2_medseqft.trainers.medseqft",
    "MedSeqFTMultitaskTrainer": "nnunetv2_medseqft.trainers.multitask",
}

PLANNERS: dict[str, str] = {
    "MedSeqFTPlanner": "nnunetv2_medseqft.planners.medseqft_planner",
    "MedSeqFTCPUPlanner": "nnunetv2_medseqft.planners.cpu_planner",
    "MedSeqFTResEncCPUPlanner": "nnunetv2_medseqft.planners.cpu_planner",
}
