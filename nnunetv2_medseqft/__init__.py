"""nnU-Net v2 plugin for MedSeqFT: sequential fine-tuning of 3D segmentation foundation models."""

__version__ = "0.1.0"
