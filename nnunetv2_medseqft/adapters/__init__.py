"""LoRA adapters (peft) on nnU-Net networks, laid out like peft's tuners: ``layer.py`` (the LoRA conv and the
conv-block re-link), ``model.py`` (add, merge, merged state, save, rebuild). The one home of the LoRA merge."""

from nnunetv2_medseqft.adapters.layer import MergedWeightConv3d, relink_conv_blocks  # noqa: F401
from nnunetv2_medseqft.adapters.model import *  # noqa: F401,F403
