"""RL rewards from cases carved out of the fold's training cases, never from its validation cases.

nnU-Net reports a fold's validation cases as unseen (``validation/summary.json``, ``nnunet-rl compare``); a reward
scored on them would select models on the very cases the comparison calls held out. A trainer that needs held-out
cases for its reward takes :class:`HeldOutRewardCases` as a base: a fixed, seeded share of the fold's training cases
becomes the *reward cases*; the network is not trained on them, the RL scores on them only, and the split is written
to ``rl_reward_cases.json`` in the fold folder.
"""
from functools import cached_property
from os.path import join

import numpy as np
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgenerators.utilities.file_and_folder_operations import maybe_mkdir_p, save_json
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

from nnunet_rl.errors import NnunetRLError

REWARD_CASES_FILE = "rl_reward_cases.json"
REWARD_SPLIT_SEED = 12345
"""The seed of nnU-Net's own 5-fold split (``generate_crossval_split``): the reward cases depend on the fold only."""


def carve_reward_cases(training_cases: list[str], fraction: float, minimum: int,
                       seed: int = REWARD_SPLIT_SEED) -> list[str]:
    """max(``minimum``, round(``fraction``·n)) of the n training cases, drawn without replacement by a seeded
    generator from the sorted identifiers (the same cases for a fold on every machine and rank), sorted."""
    cases = sorted(training_cases)
    count = max(minimum, round(fraction * len(cases)))
    if count >= len(cases):
        raise NnunetRLError(f"the fold has {len(cases)} training cases; {count} of them would be held out for the RL "
                            f"reward and none would be left to train on. Use a dataset with more cases")
    return sorted(np.random.RandomState(seed).choice(cases, count, replace=False).tolist())


class HeldOutRewardCases:
    """Trainer mixin (before the nnU-Net trainer in the bases): reward cases held out of the fold's training cases.

    - :meth:`do_split` returns nnU-Net's split with the reward cases removed from the training cases, so nnU-Net's
      training dataloader never sees them and its validation cases are unchanged;
    - ``self.dataloader_reward`` yields batches of reward cases, sampled and transformed exactly as nnU-Net's
      validation batches (patch size, foreground oversampling, no augmentation, deep-supervision targets);
    - ``rl_reward_cases.json`` in the fold folder lists the three sets.
    """
    reward_case_fraction = 0.1
    min_reward_cases = 2

    @cached_property
    def reward_split(self) -> dict[str, list[str]]:
        """nnU-Net's split of this fold with the reward cases carved out of its training cases."""
        training, validation = super().do_split()
        reward = carve_reward_cases(list(training), self.reward_case_fraction, self.min_reward_cases)
        return {"training": [case for case in training if case not in reward], "reward": reward,
                "validation": list(validation)}

    def do_split(self):
        return self.reward_split["training"], self.reward_split["validation"]

    def get_dataloaders(self):
        dataloaders = super().get_dataloaders()
        self.dataloader_reward = SingleThreadedAugmenter(self._reward_dataloader(), None)
        if self.local_rank == 0:
            maybe_mkdir_p(self.output_folder)
            save_json({**self.reward_split, "seed": REWARD_SPLIT_SEED, "fraction": self.reward_case_fraction},
                      join(self.output_folder, REWARD_CASES_FILE), sort_keys=False)
        return dataloaders

    def _reward_dataloader(self) -> nnUNetDataLoader:
        has_regions = self.label_manager.has_regions
        transforms = self.get_validation_transforms(
            self._get_deep_supervision_scales(), is_cascaded=self.is_cascaded,
            foreground_labels=self.label_manager.foreground_labels,
            regions=self.label_manager.foreground_regions if has_regions else None,
            ignore_label=self.label_manager.ignore_label)
        dataset = self.dataset_class(self.preprocessed_dataset_folder, self.reward_split["reward"],
                                     folder_with_segs_from_previous_stage=self.folder_with_segs_from_previous_stage)
        patch_size = self.configuration_manager.patch_size
        return nnUNetDataLoader(dataset, self.batch_size, patch_size, patch_size, self.label_manager,
                                oversample_foreground_percent=self.oversample_foreground_percent,
                                sampling_probabilities=None, pad_sides=None, transforms=transforms,
                                probabilistic_oversampling=self.probabilistic_oversampling)
