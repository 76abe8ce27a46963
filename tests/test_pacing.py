"""Between epochs: progress.png paced for short epochs, torch threads re-read from the lane runner's file."""

import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from nnunetv2.training.logging.nnunet_logger import MetaLogger

from nnunetv2_medseqft.pacing import PacedLogger
from nnunetv2_medseqft.threads import THREADS_FILE_ENV, refresh_torch_threads, write_threads_file


def _logged(folder, epochs: int) -> MetaLogger:
    logger = MetaLogger(str(folder), False)
    for e in range(epochs):
        logger.log("epoch_start_timestamps", time.time(), e)
        for key in ("mean_fg_dice", "train_losses", "val_losses", "lrs"):
            logger.log(key, float(np.random.rand()), e)
        logger.log("dice_per_class_or_region", [0.5], e)
        logger.log("epoch_end_timestamps", time.time() + 1, e)
    return logger


@pytest.mark.parametrize("every_s, drawn", [(3600.0, [0, 3]), (0.0, [0, 1, 2, 3])])
def test_progress_plot_is_paced_and_always_drawn_after_the_last_epoch(tmp_path, every_s, drawn):
    trainer = SimpleNamespace(logger=_logged(tmp_path, 4), current_epoch=0, num_epochs=4)
    paced = PacedLogger(trainer, every_s=every_s)
    seen = []
    for epoch in range(4):
        trainer.current_epoch, before = epoch, paced.plots
        paced.plot_progress_png(str(tmp_path))
        if paced.plots > before:
            seen.append(epoch)
    assert seen == drawn and (tmp_path / "progress.png").is_file()
    # everything else is nnU-Net's logger: values, checkpoint state
    assert paced.get_value("train_losses", step=-1) == trainer.logger.get_value("train_losses", step=-1)
    assert paced.get_checkpoint() == trainer.logger.get_checkpoint()


def test_torch_threads_follow_the_threads_file(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    path = tmp_path / "threads"
    monkeypatch.setenv(THREADS_FILE_ENV, str(path))
    try:
        write_threads_file(str(path), 1)
        refresh_torch_threads()
        assert torch.get_num_threads() == 1 and path.read_text() == "1\n"
        path.write_text("two")  # unreadable advice keeps the current count
        torch.set_num_threads(2)
        refresh_torch_threads()
        assert torch.get_num_threads() == 2
        path.unlink()
        refresh_torch_threads()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_keep_freed_memory_applies_on_glibc_and_can_be_turned_off(monkeypatch):
    import platform

    from nnunetv2_medseqft.cpu_memory import ENV, keep_freed_memory

    monkeypatch.setenv(ENV, "0")
    assert keep_freed_memory() is False
    monkeypatch.delenv(ENV)
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert keep_freed_memory() is True  # every mallopt call accepted (glibc refuses values outside its limits)
