"""nnUNetTrainer subclasses of the plugin (installed as ``nnunetv2_medseqft.trainers``)."""
