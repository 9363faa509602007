"""The demo's handling of the user's folders and data (the full run is in test_e2e.py)."""
import json

import numpy as np
import pytest

from nnunet_rl import demo
from nnunet_rl.datasets.common import write_image
from nnunet_rl.errors import NnunetRLError
from nnunet_rl.nnunet_folders import NNUNET_FOLDER_VARIABLES


@pytest.fixture
def users_folders(tmp_path, monkeypatch):
    for name in NNUNET_FOLDER_VARIABLES:
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    return tmp_path


def test_users_folders_are_used_and_their_dataset_ids_kept(users_folders):
    (users_folders / "nnUNet_results" / "Dataset900_Theirs").mkdir()
    (users_folders / "nnUNet_raw" / "Dataset901_Theirs").mkdir()
    assert demo.use_nnunet_folders() is True
    assert demo.demo_dataset_id(users_folders=True) == 902
    assert (users_folders / "nnUNet_results" / "Dataset900_Theirs").is_dir()


def test_unset_folders_go_to_the_working_directory(tmp_path, monkeypatch):
    for name in NNUNET_FOLDER_VARIABLES:  # set, then deleted: monkeypatch then also removes what the demo sets
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    assert demo.use_nnunet_folders() is False
    assert all((tmp_path / demo.DEMO_DATA_FOLDER / sub).is_dir() for sub in ("raw", "preprocessed", "results"))
    (tmp_path / demo.DEMO_DATA_FOLDER / "raw" / "Dataset900_OldDemo").mkdir()
    assert demo.demo_dataset_id(users_folders=False) == 900
    assert not (tmp_path / demo.DEMO_DATA_FOLDER / "raw" / "Dataset900_OldDemo").exists()


def test_partly_set_folders_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    monkeypatch.delenv("nnUNet_results", raising=False)
    with pytest.raises(NnunetRLError, match="nnUNet_results"):
        demo.use_nnunet_folders()


def test_hold_out_moves_whole_cases_and_updates_num_training(tmp_path):
    for sub in ("imagesTr", "labelsTr"):
        (tmp_path / sub).mkdir()
    cases = [f"case_{i:03d}" for i in range(10)]
    for case in cases:
        for channel in range(2):
            write_image(np.zeros((2, 2, 2)), tmp_path / "imagesTr" / f"{case}_{channel:04d}.nii.gz", (1, 1, 1))
        write_image(np.zeros((2, 2, 2), np.uint8), tmp_path / "labelsTr" / f"{case}.nii.gz", (1, 1, 1))
    (tmp_path / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz", "numTraining": 10}))

    demo.hold_out_cases(tmp_path, 0.2)

    assert sorted(p.name for p in (tmp_path / "labelsTs").iterdir()) == ["case_008.nii.gz", "case_009.nii.gz"]
    assert len(list((tmp_path / "imagesTs").iterdir())) == 4 and len(list((tmp_path / "imagesTr").iterdir())) == 16
    assert json.loads((tmp_path / "dataset.json").read_text())["numTraining"] == 8


def test_the_demo_ends_with_dice_per_class_and_the_policy_learned(tmp_path):
    """The terminal's short summary (mean Dice per class and trainer) and the PoseAlign figure from RL-U2Net's
    checkpointed log: the RL phase is the epochs with a reward."""
    import torch
    summary = {"trainers": ["stock", "ours"], "cases": ["a", "b"], "classes": {"1": "LV", "2": "RV"},
               "statistics": {trainer: {label: {"Dice": {"mean": dice}} for label, dice in zip("12", values)}
                              for trainer, values in (("stock", (0.81, 0.7)), ("ours", (0.8, 0.75)))}}
    text = demo.dice_summary(summary)
    assert "mean over 2 cases" in text and "| 1 LV | 0.810 | 0.800 |" in text and "| 2 RV | 0.700 | 0.750 |" in text

    nan = float("nan")
    logging = {"rl_u2net/reward": [0.5, 0.6, nan], "rl_u2net/primary_stage2/needed_rotation_probability":
               [0.05, 0.2, 0.2], "rl_u2net/primary_stage2/top_probability": [0.1, 0.3, 0.3]}
    torch.save({"logging": logging}, tmp_path / "checkpoint_final.pth")
    history = demo.policy_history(tmp_path / "checkpoint_final.pth")
    assert list(history) == ["primary_stage2"] and history["primary_stage2"]["probability"] == [0.05, 0.2, 0.2]
    text = demo.plot_policy_history(history, tmp_path / "policy.png")
    assert (tmp_path / "policy.png").stat().st_size > 0
    assert "primary_stage2 0.050 → 0.200" in text and "RL phase 2 epochs" in text
    torch.save({"logging": {"train_losses": [1.0]}}, tmp_path / "stock.pth")
    assert demo.policy_history(tmp_path / "stock.pth") == {}
