"""Every trainer on nnU-Net's 2d, 3d_lowres and 3d_cascade_fullres configurations (and MRL-Seg, whose end-to-end
test runs 2d, on 3d_fullres): it trains and predicts, or refuses the configuration with one clear error (the matrix in
docs/trainers.md).

nnU-Net plans 3d_lowres (and the cascade on top of it) only when the 3d_fullres patch covers less than a quarter of
the median image; here nnU-Net's own planner gets there on 48³ phantoms with its ``-gpu_memory_target`` lowered, as
a user would (``nnUNetv2_plan_and_preprocess -gpu_memory_target 0.02``). The cascade's first stage is stood in for by
the cases' own preprocessed segmentations, written where nnU-Net's cascade reads the first stage's predictions
(``<trainer>__<plans>__3d_lowres/predicted_next_stage/3d_cascade_fullres``): what is tested is the second stage.
Each cell trains one epoch of two iterations with its RL from the first iteration, then nnU-Net's sliding-window
predictor (``nnUNetPredictor``, as the final validation and ``nnUNetv2_predict`` use it; step size 1, no mirroring)
segments a whole validation case with the trained network.
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.utilities.label_handling.label_handling import convert_labelmap_to_one_hot

from nnunet_rl.errors import NnunetRLError
from nnunet_rl.trainer_from_plans import trainer_from_plans
from nnunet_rl.trainers import (nnUNetTrainerAllSliceFusion, nnUNetTrainerClassifierGuided, nnUNetTrainerMRLSeg,
                                nnUNetTrainerPAM, nnUNetTrainerPixelRL_noDC, nnUNetTrainerRLDeepSup,
                                nnUNetTrainerRLU2Net)
from nnunet_rl.trainers.base import RLTrainerBase
from nnunet_rl.trainers.schedules import ShortSchedule

DATASET_ID = 952
LOWRES, CASCADE, TWO_D, FULLRES = "3d_lowres", "3d_cascade_fullres", "2d", "3d_fullres"
GPU_MEMORY_TARGET_GB = 0.02


@pytest.fixture(scope="module")
def lowres_dataset(planned_dataset) -> str:
    """48³ two-channel phantoms in the session's nnU-Net folders, planned by nnU-Net with 3d_lowres and the cascade,
    then by ``nnunet-rl plan`` (preprocessing, rl block)."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments

    from nnunet_rl.datasets.synthetic import make_dataset
    from nnunet_rl.plans.planner import plan_rl
    name = make_dataset("multimodal", DATASET_ID, cases=5, size=48).name
    extract_fingerprints([DATASET_ID], num_processes=1, check_dataset_integrity=True)
    plan_experiments([DATASET_ID], gpu_memory_target_in_gb=GPU_MEMORY_TARGET_GB)
    plan_rl(name, [LOWRES, CASCADE, TWO_D])  # the cascade's preprocessed data is 3d_fullres's
    return name


def one_iteration_epoch(trainer_class: type, overrides: dict | None = None) -> type:
    """``trainer_class`` on one epoch of two training iterations and one validation iteration, its RL from the start
    (``overrides``: the rl-block keys that start it)."""
    pinned = dict(trainer_class.rl_overrides) if issubclass(trainer_class, RLTrainerBase) else {}
    for component, keys in (overrides or {}).items():
        pinned[component] = {**pinned.get(component, {}), **keys}
    return type(f"{trainer_class.__name__}_cell", (ShortSchedule, trainer_class),
                {"epochs": 1, "iterations": 2, "val_iterations": 1, "rl_overrides": pinned})


TRAINS = {
    "PAM": one_iteration_epoch(nnUNetTrainerPAM),
    "RLDeepSup": one_iteration_epoch(nnUNetTrainerRLDeepSup,
                                     {"rl_deep_supervision": {"warmup_fraction": 0.0, "rl_steps_per_epoch": 2}}),
    "PixelRL_noDC": one_iteration_epoch(nnUNetTrainerPixelRL_noDC, {"pixel_rl": {"backbone_fraction": 0.0}}),
    "MRLSeg": one_iteration_epoch(nnUNetTrainerMRLSeg, {"mrl_seg": {"segmentation_fraction": 0.0}}),
    "RLU2Net": one_iteration_epoch(nnUNetTrainerRLU2Net),  # its RL phase, the first 20 % of epochs, is epoch 0
    "ClassifierGuided": one_iteration_epoch(nnUNetTrainerClassifierGuided),
}
REFUSED = {  # (trainer, configuration): what the error says
    ("RLU2Net", CASCADE): "does not train cascade stages",
    ("ClassifierGuided", LOWRES): "refines a first stage's segmentation",
    ("ClassifierGuided", TWO_D): "refines a first stage's segmentation",
}
CELLS = [(name, configuration) for name in TRAINS for configuration in (TWO_D, LOWRES, CASCADE)
         if (name, configuration) not in REFUSED] + [("MRLSeg", FULLRES)]


def stand_in_first_stage(trainer) -> None:
    """The cases' preprocessed segmentations as the first stage's predictions, where nnU-Net's cascade reads them."""
    folder = Path(trainer.folder_with_segs_from_previous_stage)
    folder.mkdir(parents=True, exist_ok=True)
    dataset_class = infer_dataset_class(trainer.preprocessed_dataset_folder)
    cases = dataset_class(trainer.preprocessed_dataset_folder)
    for identifier in cases.identifiers:
        _, seg, _, _ = cases.load_case(identifier)
        dataset_class.save_seg(np.clip(np.asarray(seg)[0], 0, None).astype(np.uint8), str(folder / identifier))


def trained(dataset: str, trainer_class: type, configuration: str):
    torch.manual_seed(0)
    trainer = trainer_from_plans(dataset, trainer_class, configuration)
    if trainer.is_cascaded:
        stand_in_first_stage(trainer)
    trainer.run_training()
    return trainer


def predicted(trainer) -> tuple[np.ndarray, tuple]:
    """nnU-Net's sliding-window logits of the trained network on the first validation case (the cascade's input
    built as nnU-Net's final validation builds it) and the input's shape."""
    _, validation = trainer.get_tr_and_val_datasets()
    data, _, seg_prev, _ = validation.load_case(validation.identifiers[0])
    data = np.asarray(data)
    if trainer.is_cascaded:
        first_stage = convert_labelmap_to_one_hot(np.asarray(seg_prev), trainer.label_manager.foreground_labels,
                                                  output_dtype=data.dtype)
        data = np.vstack((data, first_stage))
    trainer.set_deep_supervision_enabled(False)
    trainer.network.eval()
    predictor = nnUNetPredictor(tile_step_size=1, use_mirroring=False, perform_everything_on_device=False,
                                device=torch.device("cpu"), allow_tqdm=False)  # windows side by side: fewer to run
    predictor.manual_initialization(trainer.network, trainer.plans_manager, trainer.configuration_manager, None,
                                    trainer.dataset_json, type(trainer).__name__,
                                    trainer.inference_allowed_mirroring_axes)
    return predictor.predict_sliding_window_return_logits(torch.from_numpy(data)).numpy(), data.shape


@pytest.fixture(autouse=True)
def in_process_augmentation(monkeypatch):
    """nnU-Net's augmentation in this process (no worker to start per cell): the same transforms."""
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")


def test_nnunet_planned_the_lowres_stage_and_the_cascade(lowres_dataset):
    plans = json.loads((Path(os.environ["nnUNet_preprocessed"]) / lowres_dataset / "nnUNetPlans.json").read_text())
    configurations = plans["configurations"]
    assert configurations[LOWRES]["next_stage"] in ([CASCADE], CASCADE)  # nnU-Net writes a name, we a list
    assert configurations[CASCADE]["previous_stage"] == LOWRES
    assert all("rl" in configurations[c] for c in (LOWRES, CASCADE))


@pytest.mark.parametrize("name, configuration", CELLS)
def test_trains_and_predicts(lowres_dataset, name, configuration):
    trainer = trained(lowres_dataset, TRAINS[name], configuration)
    losses = trainer.logger.local_logger.my_fantastic_logging["train_losses"]
    assert len(losses) == 1 and np.isfinite(losses[0])
    logits, shape = predicted(trainer)
    assert logits.shape == (trainer.label_manager.num_segmentation_heads, *shape[1:]) and np.isfinite(logits).all()


@pytest.mark.parametrize("name, configuration", sorted(REFUSED))
def test_refuses_with_one_clear_error(lowres_dataset, name, configuration):
    with pytest.raises(NnunetRLError, match=REFUSED[name, configuration]):
        trainer_from_plans(lowres_dataset, TRAINS[name], configuration).initialize()


@pytest.mark.parametrize("configuration", [LOWRES, CASCADE])
def test_the_all_slice_trainer_refuses_3d_configurations(lowres_dataset, configuration):
    with pytest.raises(NnunetRLError, match="2d_allslice"):
        trainer_from_plans(lowres_dataset, nnUNetTrainerAllSliceFusion, configuration).initialize()
