"""What the MedSeqFT trainers do between epochs, sized for short epochs (the CPU scale's take 5-10 s).

- progress.png: nnU-Net redraws a 3000 x 5400 px figure after every epoch, ~0.5 s of a CPU core, 8% of a 6-s
  epoch. ``PacedLogger`` redraws it at most every ``PLOT_EVERY_S`` seconds and always after the last epoch; with
  epochs of 30 s or more (nnU-Net's own budget on a GPU) every epoch is still drawn.
- torch threads: re-read at every epoch start (``refresh_torch_threads``), so that a training whose neighbour
  lane finished (``medseqft demo``) takes over the freed core.
- on a CPU, freed memory is kept for reuse (``cpu_memory.py``): ~10% of a CPU-scale epoch went to page faults.
"""

from __future__ import annotations

import time

from nnunetv2_medseqft.cpu_memory import keep_freed_memory
from nnunetv2_medseqft.threads import refresh_torch_threads

PLOT_EVERY_S = 30.0


class PacedLogger:
    """nnU-Net's logger with ``plot_progress_png`` paced; everything else is the wrapped logger's."""

    def __init__(self, trainer, every_s: float = PLOT_EVERY_S):
        self._logger, self._trainer, self._every_s = trainer.logger, trainer, every_s
        self._last_plot = None
        self.plots = 0  # drawn so far (tests)

    def __getattr__(self, name):  # only for what this class does not define
        return getattr(self._logger, name)

    def plot_progress_png(self, output_folder: str) -> None:
        t = self._trainer
        last_epoch = t.current_epoch >= t.num_epochs - 1
        if last_epoch or self._last_plot is None or time.monotonic() - self._last_plot >= self._every_s:
            self._logger.plot_progress_png(output_folder)
            self._last_plot, self.plots = time.monotonic(), self.plots + 1


class PacedEpochsMixin:
    """For nnUNetTrainer subclasses (before nnUNetTrainer in the bases)."""

    def on_train_start(self):
        if self.device.type == "cpu":  # before the loader workers are forked: they inherit it
            keep_freed_memory()
        super().on_train_start()
        if not isinstance(self.logger, PacedLogger):
            self.logger = PacedLogger(self)

    def on_epoch_start(self):
        refresh_torch_threads()
        super().on_epoch_start()
