"""End to end as a user runs it: make-dataset --kind stacked -> nnunet-rl plan -c 2d 2d_allslice -> nnUNetv2_train
2d_allslice -tr nnUNetTrainerAllSliceFusion_3epochs_2iters -> nnUNetv2_predict -c 2d_allslice."""
import json
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

from test_e2e import cli, user_environment

pytestmark = pytest.mark.e2e

DATASET_ID = "963"
CONFIGURATION = "2d_allslice"
TRAINER = "nnUNetTrainerAllSliceFusion_3epochs_2iters"


def test_all_slice_fusion_trains_and_predicts_whole_stacks(tmp_path):
    env = user_environment(tmp_path)
    cli("nnunet-rl", "make-dataset", "--kind", "stacked", "--id", DATASET_ID, "--cases", "5", "--size", "32", env=env)
    cli("nnunet-rl", "plan", DATASET_ID, "-c", "2d", CONFIGURATION, env=env)
    preprocessed = next(Path(env["nnUNet_preprocessed"]).glob(f"Dataset{DATASET_ID}_*"))
    planned = json.loads((preprocessed / "nnUNetPlans.json").read_text())["configurations"][CONFIGURATION]
    shapes = json.loads((preprocessed / "dataset_fingerprint.json").read_text())["shapes_after_crop"]
    assert planned["inherits_from"] == "2d" and planned["batch_size"] == 1
    assert planned["patch_size"] == [max(shape[0] for shape in shapes), 32, 32]  # every stack whole

    cli("nnUNetv2_train", DATASET_ID, CONFIGURATION, "0", "-tr", TRAINER, "-device", "cpu", env=env)
    fold = next(Path(env["nnUNet_results"]).glob(f"Dataset{DATASET_ID}_*")) / \
        f"{TRAINER}__nnUNetPlans__{CONFIGURATION}" / "fold_0"
    final = torch.load(fold / "checkpoint_final.pth", weights_only=False)
    assert final["inference_allowed_mirroring_axes"] == (1, 2)
    # nnU-Net's --c loads network_weights strictly: the transformers are resumed with the U-Net
    assert {key.split(".")[1] for key in final["network_weights"] if key.startswith("fusion.")} == \
        {"inter_slice", "intra_slice"}

    raw = next(Path(env["nnUNet_raw"]).glob(f"Dataset{DATASET_ID}_*"))
    output = tmp_path / "predictions"
    cli("nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(output), "-d", DATASET_ID, "-c", CONFIGURATION,
        "-tr", TRAINER, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1", env=env)
    images = sorted((raw / "imagesTs").glob("*_0000.nii.gz"))
    assert images and sorted(p.name for p in output.glob("*.nii.gz")) == \
        sorted(image.name.replace("_0000", "") for image in images)
    for image in images:
        prediction = sitk.ReadImage(str(output / image.name.replace("_0000", "")))
        assert prediction.GetSize() == sitk.ReadImage(str(image)).GetSize()
