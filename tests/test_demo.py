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
