"""End to end as a user runs the paper's two stages (docs/classifier_guided.md): make-dataset --kind stacked ->
nnunet-rl plan -c 2d_allslice_refine --previous-stage-trainer <all-slice trainer> -> nnUNetv2_train 2d_allslice on
every fold (nnUNetTrainerAllSliceFusion, fold 0 killed with SIGKILL and resumed with --c; each fold writes its
validation cases' predictions for the next stage) ->
nnUNetv2_train 2d_allslice_refine (nnUNetTrainerClassifierGuided; killed with SIGKILL, resumed with --c) ->
nnUNetv2_predict of both stages, chained with -prev_stage_predictions (and each stage exported as nnU-Net's zip,
installed into a fresh results folder and predicting there through nnU-Net's Python API) -> nnunet-rl compare of the
refinement against its first stage -> nnUNetv2_find_best_configuration on each stage and
nnUNetv2_apply_postprocessing on its predictions.

Two folds (a splits_final.json, as a user may write) instead of nnU-Net's five keep it within a minute or two."""
import json
import re
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

from nnunet_commands import (cli, export_install_and_predict_with_the_api, select_and_postprocess,
                             train_until_second_epoch_then_kill, user_environment)

pytestmark = pytest.mark.e2e

DATASET_ID = "963"
FIRST_STAGE, REFINE = "2d_allslice", "2d_allslice_refine"
FIRST_TRAINER = "nnUNetTrainerAllSliceFusion_3epochs_2iters"
REFINE_TRAINER = "nnUNetTrainerClassifierGuided_3epochs_2iters"


def predict(env: dict, raw: Path, output: Path, configuration: str, trainer: str, *options: str) -> None:
    cli("nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(output), "-d", DATASET_ID, "-c", configuration,
        "-tr", trainer, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1", *options, env=env)
    images = sorted((raw / "imagesTs").glob("*_0000.nii.gz"))
    assert images and sorted(p.name for p in output.glob("*.nii.gz")) == \
        sorted(image.name.replace("_0000", "") for image in images)
    for image in images:
        prediction = sitk.ReadImage(str(output / image.name.replace("_0000", "")))
        assert prediction.GetSize() == sitk.ReadImage(str(image)).GetSize()


def resumed_not_restarted(interrupted: dict, final: dict, fold: Path) -> None:
    """The --c run continued the killed one: three epochs in all, the epochs before the kill kept as they were, and
    the second process's log starts after them."""
    done = len(interrupted["logging"]["train_losses"])
    assert done >= 1 and final["current_epoch"] == 3 and len(final["logging"]["train_losses"]) == 3
    assert final["logging"]["train_losses"][:done] == interrupted["logging"]["train_losses"]
    logs = sorted(fold.glob("training_log_*.txt"), key=lambda log: log.stat().st_mtime)
    assert len(logs) == 2 and re.search(r": Epoch 0\s", logs[-1].read_text()) is None


def test_all_slice_first_stage_then_classifier_guided_refinement(tmp_path):
    env = user_environment(tmp_path)
    cli("nnunet-rl", "make-dataset", "--kind", "stacked", "--id", DATASET_ID, "--cases", "5", "--size", "32", env=env)
    cli("nnunet-rl", "plan", DATASET_ID, "-c", REFINE, "--previous-stage-trainer", FIRST_TRAINER, env=env)
    preprocessed = next(Path(env["nnUNet_preprocessed"]).glob(f"Dataset{DATASET_ID}_*"))
    configurations = json.loads((preprocessed / "nnUNetPlans.json").read_text())["configurations"]
    shapes = json.loads((preprocessed / "dataset_fingerprint.json").read_text())["shapes_after_crop"]
    assert configurations[FIRST_STAGE]["inherits_from"] == "2d" and configurations[FIRST_STAGE]["batch_size"] == 1
    assert configurations[FIRST_STAGE]["patch_size"] == [max(shape[0] for shape in shapes), 32, 32]  # stacks whole
    assert configurations[FIRST_STAGE]["next_stage"] == [REFINE]
    assert configurations[REFINE]["previous_stage"] == FIRST_STAGE
    cases = sorted(path.name[:-len(".pkl")] for path in (preprocessed / "nnUNetPlans_2d").glob("*.pkl"))
    (preprocessed / "splits_final.json").write_text(json.dumps(
        [{"train": cases[1::2], "val": cases[::2]}, {"train": cases[::2], "val": cases[1::2]}]))

    train_until_second_epoch_then_kill(env, FIRST_TRAINER, DATASET_ID, FIRST_STAGE)
    results = next(Path(env["nnUNet_results"]).glob(f"Dataset{DATASET_ID}_*"))
    first = results / f"{FIRST_TRAINER}__nnUNetPlans__{FIRST_STAGE}"
    interrupted = torch.load(first / "fold_0" / "checkpoint_latest.pth", weights_only=False)
    assert not (first / "fold_0" / "checkpoint_final.pth").exists()
    # nnU-Net's --c loads network_weights strictly: the transformers are resumed with the U-Net
    assert {key.split(".")[1] for key in interrupted["network_weights"] if key.startswith("fusion.")} == \
        {"inter_slice", "intra_slice"}
    cli("nnUNetv2_train", DATASET_ID, FIRST_STAGE, "0", "-tr", FIRST_TRAINER, "-device", "cpu", "--c", env=env)
    cli("nnUNetv2_train", DATASET_ID, FIRST_STAGE, "1", "-tr", FIRST_TRAINER, "-device", "cpu", env=env)
    final = torch.load(first / "fold_0" / "checkpoint_final.pth", weights_only=False)
    assert final["inference_allowed_mirroring_axes"] == (1, 2)
    resumed_not_restarted(interrupted, final, first / "fold_0")
    assert sorted(path.stem for path in (first / "predicted_next_stage" / REFINE).iterdir()) == cases

    train_until_second_epoch_then_kill(env, REFINE_TRAINER, DATASET_ID, REFINE)
    refine = results / f"{REFINE_TRAINER}__nnUNetPlans__{REFINE}"
    interrupted = torch.load(refine / "fold_0" / "checkpoint_latest.pth", weights_only=False)
    assert interrupted["current_epoch"] >= 1 and not (refine / "fold_0" / "checkpoint_final.pth").exists()
    # nnU-Net's --c loads network_weights strictly: the presence head is resumed with the U-Net
    assert any(key.startswith("presence_head.") for key in interrupted["network_weights"])
    cli("nnUNetv2_train", DATASET_ID, REFINE, "0", "-tr", REFINE_TRAINER, "-device", "cpu", "--npz", "--c", env=env)
    resumed_not_restarted(interrupted, torch.load(refine / "fold_0" / "checkpoint_final.pth", weights_only=False),
                          refine / "fold_0")
    assert "presence head accuracy" in sorted((refine / "fold_0").glob("training_log_*.txt"))[-1].read_text()

    raw = next(Path(env["nnUNet_raw"]).glob(f"Dataset{DATASET_ID}_*"))
    predict(env, raw, tmp_path / "stage1", FIRST_STAGE, FIRST_TRAINER)
    predict(env, raw, tmp_path / "stage2", REFINE, REFINE_TRAINER, "-prev_stage_predictions", str(tmp_path / "stage1"))
    for trainer, configuration, stage, previous in ((FIRST_TRAINER, FIRST_STAGE, "stage1", None),
                                                    (REFINE_TRAINER, REFINE, "stage2", tmp_path / "stage1")):
        export_install_and_predict_with_the_api(env, trainer, tmp_path / stage, tmp_path, dataset_id=DATASET_ID,
                                                configuration=configuration, previous_stage=previous)

    report = cli("nnunet-rl", "compare", DATASET_ID, "-c", FIRST_STAGE, "-tr", FIRST_TRAINER,
                 f"{REFINE_TRAINER}__nnUNetPlans__{REFINE}", "-f", "0", "-o", str(tmp_path / "comparison"), env=env)
    assert f"{len(cases[::2])} paired cases" in report

    # nnU-Net's model selection on each stage's cross-validation (it takes every -c × -tr pair, so two stages with
    # different trainers are selected in runs of their own; docs/classifier_guided.md), then its postprocessing
    for trainer, configuration, stage in ((FIRST_TRAINER, FIRST_STAGE, "stage1"), (REFINE_TRAINER, REFINE, "stage2")):
        select_and_postprocess(env, DATASET_ID, configuration, trainer, tmp_path / stage, tmp_path / f"{stage}_pp")
