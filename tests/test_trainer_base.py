"""The shared trainer plumbing: the plans' rl block, telemetry in nnU-Net's logger, RL state in checkpoints."""
import dataclasses
import math
import os

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json


from nnunet_rl.errors import NnunetRLError
from nnunet_rl.plans.rl_block import DatasetFacts, channel_split, label_fractions, read_rl_block
from nnunet_rl.telemetry import RLLocalLogger, magnitude, scale_groups
from nnunet_rl.trainers.base import CHECKPOINT_KEY, AtomicCheckpointTrainer, RLTrainerBase
from nnunet_rl.trainers.rl_u2net import channel_indices
from nnunet_rl.trainer_from_plans import trainer_from_plans


class CountingTrainer(RLTrainerBase):
    """A trainer with RL-like state: a tensor, an optimiser of its own and a plain counter."""

    def initialize(self):
        super().initialize()
        self.agent = torch.nn.Linear(3, 2)
        self.agent_optimizer = torch.optim.Adam(self.agent.parameters(), lr=1e-3)
        self.updates = 0
        self.register_telemetry("agent/reward")

    def rl_state_dict(self) -> dict:
        return {"agent": self.agent.state_dict(), "agent_optimizer": self.agent_optimizer.state_dict(),
                "updates": self.updates}

    def load_rl_state_dict(self, state: dict) -> None:
        self.agent.load_state_dict(state["agent"])
        self.agent_optimizer.load_state_dict(state["agent_optimizer"])
        self.updates = state["updates"]


def test_rl_state_round_trips_through_nnunet_checkpoint(planned_dataset, tmp_path):
    trainer = trainer_from_plans(planned_dataset, CountingTrainer)
    trainer.initialize()
    torch.nn.init.constant_(trainer.agent.weight, 0.25)
    trainer.agent(torch.ones(1, 3)).sum().backward()
    trainer.agent_optimizer.step()
    trainer.updates = 7
    checkpoint_file = str(tmp_path / "checkpoint_latest.pth")
    trainer.save_checkpoint(checkpoint_file)

    saved = torch.load(checkpoint_file, weights_only=False)
    assert saved[CHECKPOINT_KEY]["updates"] == 7 and saved["trainer_name"] == "CountingTrainer"
    assert not (tmp_path / "checkpoint_latest.pth.partial").exists()

    resumed = trainer_from_plans(planned_dataset, CountingTrainer)
    resumed.load_checkpoint(checkpoint_file)
    assert resumed.updates == 7
    torch.testing.assert_close(resumed.agent.weight, trainer.agent.weight)
    assert resumed.agent_optimizer.state_dict()["state"][0]["step"] == 1


def test_checkpoint_without_rl_state_loads_and_says_so(planned_dataset, tmp_path):
    trainer = trainer_from_plans(planned_dataset, CountingTrainer)
    trainer.initialize()
    trainer.updates = 5
    file = str(tmp_path / "checkpoint.pth")
    trainer.save_checkpoint(file)
    checkpoint = torch.load(file, weights_only=False)
    del checkpoint[CHECKPOINT_KEY]
    fresh = trainer_from_plans(planned_dataset, CountingTrainer)
    fresh.load_checkpoint(checkpoint)  # a dict, which nnU-Net's own load_checkpoint cannot take
    assert fresh.current_epoch == 1
    assert fresh.updates == 0  # the RL state starts afresh instead of failing on the missing entry
    with open(fresh.log_file) as log:
        assert "holds no nnunet_rl state" in log.read()


def test_telemetry_reaches_the_log_and_the_progress_plot(planned_dataset, tmp_path):
    trainer = trainer_from_plans(planned_dataset, CountingTrainer)
    trainer.initialize()
    logger = trainer.logger
    for epoch in range(2):
        trainer.current_epoch = epoch
        for key in ("mean_fg_dice", "train_losses", "val_losses", "lrs", "epoch_start_timestamps"):
            logger.log(key, 0.5, epoch)
        logger.log("dice_per_class_or_region", [0.5], epoch)
        if epoch == 0:
            trainer.log_telemetry("agent/reward", 1.5)
        logger.log("epoch_end_timestamps", 1.0, epoch)
        logger.local_logger.fill_missing(epoch)
    values = logger.get_value("agent/reward", step=None)
    assert values[0] == 1.5 and math.isnan(values[1])

    RLLocalLogger.plot_progress_png(logger.local_logger, str(tmp_path))
    with_panel = plt.imread(str(tmp_path / "progress.png")).shape
    plain = RLLocalLogger()
    plain.load_checkpoint(logger.get_checkpoint())
    plain.extra_keys = []
    plain.plot_progress_png(str(tmp_path))
    assert with_panel[0] > plt.imread(str(tmp_path / "progress.png")).shape[0]


def test_telemetry_of_different_scales_gets_its_own_axis():
    """A loss falling from 12 to 7 does not share an axis with a probability rising from 0.04 to 1 or a reward."""
    groups = scale_groups({"rl_u2net/alignment_loss": [12.0, 7.0], "rl_u2net/m/top_probability": [0.04, 1.0],
                           "rl_u2net/reward": [math.nan, -0.3], "agent/skipped_updates": [0.0, 40.0],
                           "agent/not_logged": [math.nan, math.nan]})
    assert groups == {0: ["rl_u2net/m/top_probability", "rl_u2net/reward", "agent/not_logged"],
                      2: ["rl_u2net/alignment_loss", "agent/skipped_updates"]}
    assert magnitude([0.5]) == 0 and magnitude([1.0]) == 0 and magnitude([1.5]) == 1 and magnitude([-250.0]) == 3


def test_logger_checkpoint_without_extra_keys_is_padded():
    logger = RLLocalLogger()
    logger.register("agent/reward")
    stock = RLLocalLogger().get_checkpoint()
    stock = {k: [1.0, 2.0] for k in stock}
    logger.load_checkpoint(stock)
    assert len(logger.get_value("agent/reward", None)) == 2


def test_rl_block_is_read_from_plans_and_derived_when_absent(planned_dataset):
    trainer = trainer_from_plans(planned_dataset, CountingTrainer)
    planned = trainer.configuration_manager.configuration["rl"]
    assert trainer.rl_block == planned
    assert planned["dataset"]["primary_channels"] == ["CT"]
    assert planned["dataset"]["auxiliary_channels"] == ["MRI"]
    del trainer.configuration_manager.configuration["rl"]
    gt = os.path.join(os.environ["nnUNet_preprocessed"], planned_dataset, "gt_segmentations")
    assert read_rl_block(trainer.configuration_manager, trainer.dataset_json, gt) == planned


@dataclasses.dataclass(frozen=True)
class ToySettings:
    lr: float = 5e-5
    clip: float = 0.2


def test_component_sections_take_paper_defaults_and_plans_overrides(planned_dataset, monkeypatch):
    """A component's settings: a frozen dataclass of its defaults, overridden by the plans (typed, by keyword), and
    written in full into a derived rl block."""
    from nnunet_rl.plans import rl_block
    monkeypatch.setitem(rl_block.COMPONENT_SETTINGS, "toy_agent", ToySettings)
    trainer = trainer_from_plans(planned_dataset, CountingTrainer)
    trainer.configuration_manager.configuration["rl"]["toy_agent"] = {"clip": 0.1}
    assert trainer.rl_hyperparameters("toy_agent") == ToySettings(lr=5e-5, clip=0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        trainer.rl_hyperparameters("toy_agent").clip = 0.3
    assert rl_block.derive_rl_block(trainer.dataset_json, None)["toy_agent"] == {"lr": 5e-5, "clip": 0.2}
    trainer.configuration_manager.configuration["rl"]["toy_agent"] = {"clipp": 0.1}
    with pytest.raises(NnunetRLError, match="clipp"):
        trainer.rl_hyperparameters("toy_agent")


def test_rl_block_with_names_and_indices_that_disagree_is_refused(planned_dataset):
    trainer = trainer_from_plans(planned_dataset, CountingTrainer)
    split = trainer.configuration_manager.configuration["rl"]["dataset"]
    split.update(primary_channels=["MRI"], auxiliary_channels=["CT"])  # names swapped, indices not
    with pytest.raises(NnunetRLError, match=r"for these names they are \[0\]"):
        _ = trainer.rl_block


def test_rl_block_of_another_version_is_refused(planned_dataset):
    trainer = trainer_from_plans(planned_dataset, CountingTrainer)
    trainer.configuration_manager.configuration["rl"]["version"] = 99
    with pytest.raises(NnunetRLError, match="version 99"):
        _ = trainer.rl_block


def test_channel_split_by_name():
    channels = {"0": "T2", "1": "ADC", "2": "DWI"}
    assert channel_split(channels) == {"primary_channels": ["T2"], "auxiliary_channels": ["ADC", "DWI"],
                                       "primary_indices": [0], "auxiliary_indices": [1, 2]}
    assert channel_split(channels, ["T2"]) == {"primary_channels": ["ADC", "DWI"], "auxiliary_channels": ["T2"],
                                               "primary_indices": [1, 2], "auxiliary_indices": [0]}
    with pytest.raises(NnunetRLError, match="FLAIR"):
        channel_split(channels, ["FLAIR"])


def test_the_dataset_section_is_typed_and_refuses_unknown_or_missing_keys():
    split = channel_split({"0": "CT", "1": "MRI"})
    facts = DatasetFacts.from_block({"dataset": {**split, "label_fractions": {"LV": 0.04}}})
    assert (facts.primary_indices, facts.auxiliary_indices, facts.label_fractions) == ([0], [1], {"LV": 0.04})
    assert DatasetFacts.from_block({"dataset": split}).label_fractions is None
    for section in ({**split, "label_fraction": {"LV": 0.04}}, {"primary_channels": ["CT"]}):
        with pytest.raises(NnunetRLError, match="rerun `nnunet-rl plan`"):
            DatasetFacts.from_block({"dataset": section})
    # stock plans (no block) and blocks planned before the indices existed: channel 0 and the rest
    names_only = {"dataset": {"primary_channels": ["CT"], "auxiliary_channels": ["MRI", "PET"]}}
    assert channel_indices({}, 3) == channel_indices(names_only, 3) == ([0], [1, 2])
    assert channel_indices({"dataset": split}, 2) == ([0], [1])


def test_label_fractions_are_mean_voxel_fractions(tmp_path):
    from nnunet_rl.datasets.common import write_image
    first, second = np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8)
    first[0] = 1                      # 1/4 of the voxels
    second[:2] = 1
    second[0, 0, 0] = 2               # 1/2 - 1/64 and 1/64
    write_image(first, tmp_path / "a.nii.gz", (1, 1, 1))
    write_image(second, tmp_path / "b.nii.gz", (1, 1, 1))
    dataset_json = {"labels": {"background": 0, "organ": 1, "lesion": 2}, "file_ending": ".nii.gz"}
    fractions = label_fractions(tmp_path, dataset_json)
    assert fractions == pytest.approx({"organ": (0.25 + 0.5 - 1 / 64) / 2, "lesion": 1 / 128})


def test_plan_writes_the_block_into_each_configuration(planned_dataset):
    plans = load_json(os.path.join(os.environ["nnUNet_preprocessed"], planned_dataset, "nnUNetPlans.json"))
    assert {"2d", "3d_fullres"} <= {c for c, v in plans["configurations"].items() if "rl" in v}
    fractions = plans["configurations"]["3d_fullres"]["rl"]["dataset"]["label_fractions"]
    assert set(fractions) == {"LV", "RV", "LA", "RA", "myocardium", "aorta", "pulmonary_artery"}
    assert all(0 < f < 0.5 for f in fractions.values())


def test_plan_refuses_unknown_configuration(planned_dataset):
    from nnunet_rl.plans.planner import plan_rl
    with pytest.raises(NnunetRLError, match="3d_huge"):
        plan_rl(planned_dataset, ["3d_huge"])


@pytest.mark.parametrize("damage", ["unreadable image", "missing label"])
def test_plan_reports_a_bad_dataset_in_one_line_before_any_work(planned_dataset, damage):
    """nnU-Net's integrity check runs first and its failure names the first bad file (not a pool's traceback)."""
    from pathlib import Path

    from nnunet_rl.datasets.synthetic import make_dataset
    from nnunet_rl.plans.planner import plan_rl
    dataset_id = {"unreadable image": 967, "missing label": 968}[damage]
    folder = make_dataset("stacked", dataset_id, cases=5, size=32)
    if damage == "unreadable image":
        (folder / "imagesTr" / "case_002_0000.nii.gz").write_text("not an image")
        expected = "case_002_0000.nii.gz"
    else:
        (folder / "labelsTr" / "case_001.nii.gz").unlink()
        expected = "case_001"
    with pytest.raises(NnunetRLError, match=f"{folder.name} fails nnU-Net's dataset integrity check: .*{expected}"):
        plan_rl(folder.name, ["2d"])
    assert not (Path(os.environ["nnUNet_preprocessed"]) / folder.name / "dataset_fingerprint.json").exists()


@pytest.mark.parametrize("trainer_class", [CountingTrainer, AtomicCheckpointTrainer])
def test_a_save_interrupted_while_writing_keeps_the_last_complete_checkpoint(planned_dataset, tmp_path,
                                                                             monkeypatch, trainer_class):
    """A run killed while torch.save writes checkpoint_latest.pth must stay resumable with --c."""
    trainer = trainer_from_plans(planned_dataset, trainer_class)
    trainer.initialize()
    file = tmp_path / "checkpoint_latest.pth"
    trainer.save_checkpoint(str(file))
    complete = file.read_bytes()

    def torn_save(obj, filename, *args, **kwargs):
        with open(filename, "wb") as handle:
            handle.write(complete[:100])
        raise KeyboardInterrupt  # the process dies in the middle of the write

    monkeypatch.setattr(torch, "save", torn_save)
    trainer.current_epoch = 1
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(str(file))
    assert file.read_bytes() == complete
    assert torch.load(file, weights_only=False)["current_epoch"] == 1  # nnU-Net stores the epoch to resume at
