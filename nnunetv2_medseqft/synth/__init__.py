"""Generated multi-task CT-like benchmark data in nnU-Net raw format.

``generate(out_dir, preset="tiny", seed=0, first_id=500, num_tasks=4, overwrite=False)`` writes
(``medseqft synth`` is the CLI; ``default_datasets()`` lists what it writes):

  id   folder                       role     labels (sites)
  500  Dataset500_MSFTPool          pool     body (pool sites A, B), for self-supervision
  501  Dataset501_MSFTLiver         task     liver incl. lesions (half A/B, half shifted site C)
  502  Dataset502_MSFTSpleen        task     spleen (A/B + C)
  503  Dataset503_MSFTKidney        task     kidney incl. lesions (A/B + C)
  504  Dataset504_MSFTPancreas      task     pancreas (A/B + C)
  505  Dataset505_MSFTLiverLesion   unseen   liver_lesion (new site D)
  506  Dataset506_MSFTStomach       unseen   stomach (new site D)

Ids are consecutive from ``first_id``; with ``num_tasks`` < 4 the unseen datasets follow the last
task. Every case is a whole abdomen (anatomy.py), acquired by one site (sites.py); datasets differ
only in which structures they label (datasets.py). Presets: ``tiny`` (8 cases per dataset, 16 in the
pool, ~32^3 voxels) and ``bench`` (24 / 48, ~64^3).
"""

from nnunetv2_medseqft.synth.datasets import PRESETS, PlannedDataset, default_datasets, generate, stale_datasets

__all__ = ["PRESETS", "PlannedDataset", "default_datasets", "generate", "stale_datasets"]
