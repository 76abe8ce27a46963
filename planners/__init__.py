"""Planning and sample-selection hooks (installed as ``nnunetv2_medseqft.planners``)."""
