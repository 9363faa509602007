"""nnU-Net's augmenters (batchgenerators' single- and multi-process ones), handled as ``nnUNetTrainer`` handles them:
by their class."""
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter

WITH_WORKERS = (NonDetMultiThreadedAugmenter, MultiThreadedAugmenter)
"""The augmenters with background workers, which ``nnUNetTrainer.on_train_end`` stops."""


class JoinedAugmenters:
    """A loader that draws from several of nnU-Net's augmenters (``augmenters``); :func:`stop_workers` stops each."""

    augmenters: tuple


def stop_workers(augmenter) -> None:
    """Stop the augmenter's background workers as ``nnUNetTrainer.on_train_end`` does (every part of a
    :class:`JoinedAugmenters`); others have none."""
    if isinstance(augmenter, JoinedAugmenters):
        for part in augmenter.augmenters:
            stop_workers(part)
    elif isinstance(augmenter, WITH_WORKERS):
        augmenter._finish()


def data_loader(augmenter):
    """The ``nnUNetDataLoader`` that feeds nnU-Net's augmenter."""
    if isinstance(augmenter, WITH_WORKERS):
        return augmenter.generator
    if isinstance(augmenter, SingleThreadedAugmenter):
        return augmenter.data_loader
    raise TypeError(f"not one of nnU-Net's augmenters: {type(augmenter).__name__}")
