"""End to end through the real commands a user types: make-dataset -> plan -> nnUNetv2_train (killed and
resumed with --c) -> nnUNetv2_predict -> nnunet-rl compare; and the demo on real MSD Hippocampus data."""
import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from helpers import SHARED, wandb_history
from nnunet_commands import (BIN, apply_postprocessing, cli, export_install_and_predict_with_the_api, fold_folder,
                             select_and_postprocess, train_until_second_epoch_then_kill, user_environment)

pytestmark = pytest.mark.e2e

DATASET_ID = "961"
CONFIGURATION = "3d_fullres"
STOCK = "nnUNetTrainer_3epochs_2iters"
OURS = "nnUNetTrainerPAM_3epochs_2iters"
RL_U2NET = "nnUNetTrainerRLU2Net_3epochs_2iters"
RL_DEEP_SUPERVISION = "nnUNetTrainerRLDeepSup_3epochs_2iters"
PIXEL_RL = "nnUNetTrainerPixelRL_noDC_3epochs_2iters"
MRL_SEG, MRL_SEG_CONFIGURATION = "nnUNetTrainerMRLSeg_3epochs_2iters", "2d"
MODEL_SELECTION = (STOCK, OURS, RL_U2NET, RL_DEEP_SUPERVISION, PIXEL_RL)
HIPPOCAMPUS = SHARED / "data" / "Task04_Hippocampus"
WANDB_OFFLINE = {"nnUNet_wandb_enabled": "1", "nnUNet_wandb_mode": "offline", "WANDB_SILENT": "true"}


def e2e_fold(env: dict, trainer: str, configuration: str = CONFIGURATION) -> Path:
    """Fold 0 of ``trainer`` on this module's dataset."""
    return fold_folder(env, trainer, DATASET_ID, configuration)


@pytest.fixture(scope="module")
def trainer_environment(tmp_path_factory) -> dict:
    """A user's shell whose nnU-Net folders hold the two-modality phantoms (auxiliary modality rotated by a known
    rotation, for RL-U2Net; the other trainers ignore it), made and planned for 3d_fullres and 2d through our CLI once
    for the module. The tests train into the one results folder, as a user's runs accumulate (the RL-U2Net ablation
    reuses the stock run of the PAM test, as it would a user's)."""
    env = user_environment(tmp_path_factory.mktemp("e2e"))
    cli("nnunet-rl", "make-dataset", "--kind", "multimodal", "--id", DATASET_ID, "--cases", "6", "--size", "32",
        "--rotate-aux", "fixed", env=env)
    cli("nnunet-rl", "plan", DATASET_ID, "-c", CONFIGURATION, "2d", env=env)
    return env


def predict(env: dict, trainer: str, output: Path, configuration: str = CONFIGURATION, *options: str) -> None:
    raw = next(Path(env["nnUNet_raw"]).glob(f"Dataset{DATASET_ID}_*"))
    cli("nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(output), "-d", DATASET_ID, "-c",
        configuration, "-tr", trainer, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1", *options, env=env)
    assert sorted(p.name for p in output.glob("*.nii.gz")) == sorted(p.name for p in (raw / "labelsTs").glob(
        "*.nii.gz"))


def predicted_test_cases(env: dict, trainer: str, configuration: str = CONFIGURATION) -> Path:
    """nnUNetv2_predict of the test cases with ``--save_probabilities`` into a folder the module's tests share (as a
    user keeps them for nnUNetv2_ensemble), predicted on first use."""
    output = Path(env["nnUNet_results"]).parent / "predictions" / f"{trainer}__{configuration}"
    if not output.is_dir():
        predict(env, trainer, output, configuration, "--save_probabilities")
    return output


def assert_telemetry_reached_wandb(fold: Path, prefix: str) -> None:
    """Each RL telemetry key under ``prefix`` with a value: the finite values nnU-Net's logger holds (the final
    checkpoint) are what the run's offline W&B history received, epoch by epoch (NaN where a component had nothing
    to report; a key a variant never reports, e.g. PPO's statistics without PPO, holds only NaN)."""
    logging = torch.load(fold / "checkpoint_final.pth", weights_only=False)["logging"]
    logged = wandb_history(next(fold.glob("wandb/offline-run-*/run-*.wandb")))
    reported = {key: [v for v in values if math.isfinite(v)] for key, values in logging.items()
                if key.startswith(prefix) and any(math.isfinite(v) for v in values)}
    assert reported and set(reported) <= set(logged)
    for key, values in reported.items():
        received = [v for v in logged[key] if isinstance(v, (int, float)) and math.isfinite(v)]
        assert received == pytest.approx(values), key


def test_pam_trains_resumes_predicts_and_compares(trainer_environment, tmp_path):
    env = trainer_environment

    train_until_second_epoch_then_kill(env, OURS, DATASET_ID, CONFIGURATION)
    interrupted = torch.load(e2e_fold(env, OURS) / "checkpoint_latest.pth", weights_only=False)
    assert interrupted["current_epoch"] >= 1 and "nnunet_rl" in interrupted
    assert not (e2e_fold(env, OURS) / "checkpoint_final.pth").exists()

    cli("nnUNetv2_train", DATASET_ID, CONFIGURATION, "0", "-tr", OURS, "-device", "cpu", "--npz", "--c", env=env)
    final = torch.load(e2e_fold(env, OURS) / "checkpoint_final.pth", weights_only=False)
    assert final["current_epoch"] == 3 and final["trainer_name"] == OURS
    assert len(final["logging"]["train_losses"]) == 3
    resumed_logs = list(e2e_fold(env, OURS).glob("training_log_*.txt"))
    assert len(resumed_logs) == 2  # one per process: the interrupted run and the resumed one

    cli("nnUNetv2_train", DATASET_ID, CONFIGURATION, "0", "-tr", STOCK, "-device", "cpu", "--npz", env=env)

    predictions = predicted_test_cases(env, OURS)

    report = tmp_path / "report"
    out = cli("nnunet-rl", "compare", DATASET_ID, "-c", CONFIGURATION, "-tr", STOCK, OURS, "-f", "0", "-o",
              str(report), env=env)
    assert "Wilcoxon" in out
    summary = json.loads((report / "summary.json").read_text())
    assert summary["trainers"] == [STOCK, OURS]
    assert len(summary["cases"]) == 2  # fold 0's validation cases of 6 training cases
    for name in ("report.md", "metrics.csv", "summary.json", "boxplot_Dice.png"):
        assert (report / name).is_file(), name

    export_install_and_predict_with_the_api(env, OURS, predictions, tmp_path, dataset_id=DATASET_ID,
                                            configuration=CONFIGURATION)


def test_rl_u2net_trains_resumes_predicts_and_runs_the_ablation(trainer_environment, tmp_path):
    """RL-U2Net through nnU-Net's commands (kill -9, --c, predict), then `nnunet-rl ablation --schedule quick`,
    which reuses that run and trains stock nnU-Net and, to keep the suite short, one ablation (`--variants`; the
    other four train a step and resume in tests/test_rl_u2net.py)."""
    trainer = RL_U2NET
    env = trainer_environment
    train_until_second_epoch_then_kill(env, trainer, DATASET_ID, CONFIGURATION)
    interrupted = torch.load(e2e_fold(env, trainer) / "checkpoint_latest.pth", weights_only=False)
    assert set(interrupted["nnunet_rl"]["agents"]) == set(interrupted["nnunet_rl"]["buffers"])
    cli("nnUNetv2_train", DATASET_ID, CONFIGURATION, "0", "-tr", trainer, "-device", "cpu", "--npz", "--c", env=env)
    policy = json.loads((e2e_fold(env, trainer) / "rl_policy.json").read_text())
    assert all(len(m["rotations"]) == 24 for m in policy["modules"].values())
    predict(env, trainer, tmp_path / "predictions")
    export_install_and_predict_with_the_api(env, trainer, tmp_path / "predictions", tmp_path, dataset_id=DATASET_ID,
                                            configuration=CONFIGURATION)

    out = cli("nnunet-rl", "ablation", DATASET_ID, "-c", CONFIGURATION, "-f", "0", "--schedule", "quick",
              "--variants", "noPPO", "-device", "cpu", env={**env, **WANDB_OFFLINE})
    assert f"reusing {e2e_fold(env, trainer)}" in out
    assert_telemetry_reached_wandb(e2e_fold(env, "nnUNetTrainerRLU2Net_noPPO_3epochs_2iters"), "rl_u2net/")
    table = next(Path(env["nnUNet_results"]).glob(f"Dataset{DATASET_ID}_*/ablation__*/table2.md")).read_text()
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")]
    assert rows[1:] == ["nnU-Net (stock)", "RL-U2Net", "w/o PPO (identity rotation)"]  # rows[0]: the header


def test_rl_deep_supervision_trains_and_predicts_with_nnunet_commands(trainer_environment, tmp_path):
    """Trained with nnU-Net's W&B logger on (offline, the `wandb` extra): the RL telemetry reaches the W&B run.
    nnUNetTrainerAWSnet (PAM and DAS in one network) trains in-process in tests/test_rl_deep_supervision_trainer.py:
    its PAM half goes through these commands in the PAM test, its DAS half here."""
    trainer = RL_DEEP_SUPERVISION
    env = {**trainer_environment, **WANDB_OFFLINE}
    cli("nnUNetv2_train", DATASET_ID, CONFIGURATION, "0", "-tr", trainer, "-device", "cpu", "--npz", env=env)
    learned = json.loads((e2e_fold(env, trainer) / "rl_deep_supervision.json").read_text())
    assert sum(learned["alpha"]) == pytest.approx(1.0) and learned["alpha"][-1] == 0
    assert_telemetry_reached_wandb(e2e_fold(env, trainer), "rl_deep_supervision/")
    logging = torch.load(e2e_fold(env, trainer) / "checkpoint_final.pth", weights_only=False)["logging"]
    for i, alpha in enumerate(learned["alpha"]):  # one value per epoch, the last the learned weight
        assert len(logging[f"rl_deep_supervision/alpha_{i}"]) == 3
        assert logging[f"rl_deep_supervision/alpha_{i}"][-1] == pytest.approx(alpha)
    split = json.loads((e2e_fold(env, trainer) / "rl_reward_cases.json").read_text())
    assert split["reward"] and not set(split["reward"]) & set(split["validation"])
    predict(env, trainer, tmp_path / "predictions")
    export_install_and_predict_with_the_api(env, trainer, tmp_path / "predictions", tmp_path, dataset_id=DATASET_ID,
                                            configuration=CONFIGURATION)


def test_pixel_rl_trains_and_predicts_with_nnunet_commands(trainer_environment, tmp_path):
    """Backbone phase (epoch 0) then RL phase (epochs 1-2), with nnU-Net's W&B logger on (offline): the RL telemetry
    reaches the W&B run; nnUNetv2_predict rebuilds the heads and refines. The _noDC variant: the same code with
    undilated heads, because PyTorch's CPU backward of dilated 3D convolutions takes minutes here (docs/pixel_rl.md)."""
    trainer = PIXEL_RL
    env = {**trainer_environment, **WANDB_OFFLINE}
    cli("nnUNetv2_train", DATASET_ID, CONFIGURATION, "0", "-tr", trainer, "-device", "cpu", "--npz", env=env)
    final = torch.load(e2e_fold(env, trainer) / "checkpoint_final.pth", weights_only=False)
    assert any(key.startswith("actor_critic.returns.omega") for key in final["network_weights"])
    assert "action_generator" in final["nnunet_rl"]
    rewards = final["logging"]["pixel_rl/reward"]
    assert math.isnan(rewards[0]) and all(math.isfinite(r) for r in rewards[1:])
    assert final["logging"]["pixel_rl/skipped_updates"][1:] == [0, 0]
    assert_telemetry_reached_wandb(e2e_fold(env, trainer), "pixel_rl/")
    steps = json.loads((e2e_fold(env, trainer) / "pixel_rl_steps.json").read_text())["dice_per_step"]
    assert sorted(steps) == ["1", "2"] and all(len(dice) == 11 for dice in steps.values())  # f(0) … f(10)
    assert (e2e_fold(env, trainer) / "pixel_rl_steps.png").is_file()
    export_install_and_predict_with_the_api(env, trainer, predicted_test_cases(env, trainer), tmp_path,
                                            dataset_id=DATASET_ID, configuration=CONFIGURATION)


def test_mrl_seg_trains_and_predicts_with_nnunet_commands(trainer_environment, tmp_path):
    """Segmentation-Net pre-training (epoch 0), then the RL phase (epochs 1-2) with the Reinforcement-Net initialised
    from it; nnUNetv2_predict rebuilds both and segments the greedily masked input. In 2d: the same code as 3d, whose
    final validation and prediction (eight mirrorings of five networks per window) take minutes on these CPUs. With
    nnU-Net's W&B logger on (offline)."""
    trainer, configuration = MRL_SEG, MRL_SEG_CONFIGURATION
    env = {**trainer_environment, **WANDB_OFFLINE}
    cli("nnUNetv2_train", DATASET_ID, configuration, "0", "-tr", trainer, "-device", "cpu", env=env)
    fold = e2e_fold(env, trainer, configuration)
    final = torch.load(fold / "checkpoint_final.pth", weights_only=False)
    assert any(key.startswith("reinforcement.actor_critic.returns.omega") for key in final["network_weights"])
    assert "action_generator" in final["nnunet_rl"]
    rewards = final["logging"]["mrl_seg/reward_step4"]
    assert math.isnan(rewards[0]) and all(math.isfinite(r) for r in rewards[1:])
    assert final["logging"]["mrl_seg/skipped_updates"][1:] == [0, 0]
    steps = json.loads((fold / "mrl_seg_steps.json").read_text())["dice_per_step"]
    assert sorted(steps) == ["1", "2"] and all(len(dice) == 5 for dice in steps.values())  # s(0) … s(4)
    for figure in ("mrl_seg_steps.png", "mrl_seg_masks.png"):
        assert (fold / figure).is_file(), figure
    assert_telemetry_reached_wandb(fold, "mrl_seg/")
    predictions = predicted_test_cases(env, trainer, configuration)
    export_install_and_predict_with_the_api(env, trainer, predictions, tmp_path, dataset_id=DATASET_ID,
                                            configuration=configuration)
    select_and_postprocess(env, DATASET_ID, configuration, trainer, predictions, tmp_path / "postprocessed")


def test_model_selection_ensembles_stock_and_every_rl_trainer(trainer_environment, tmp_path):
    """nnU-Net's model selection over stock nnU-Net and every 3d_fullres trainer of this module (reusing their runs,
    trained here with ``--npz`` when this test runs alone): nnUNetv2_find_best_configuration ensembles each pair's
    cross-validation probabilities, picks a model or an ensemble and its postprocessing, which
    nnUNetv2_apply_postprocessing applies to each trainer's own validation segmentations; nnUNetv2_ensemble averages
    PAM's, PixelRL's and MRL-Seg's (2d) probabilities of the test cases (nnUNetv2_predict --save_probabilities)."""
    env = trainer_environment
    for trainer, configuration in (*((trainer, CONFIGURATION) for trainer in MODEL_SELECTION),
                                   (MRL_SEG, MRL_SEG_CONFIGURATION)):
        if not (e2e_fold(env, trainer, configuration) / "checkpoint_final.pth").is_file():
            cli("nnUNetv2_train", DATASET_ID, configuration, "0", "-tr", trainer, "-device", "cpu", "--npz", env=env)
    cli("nnUNetv2_find_best_configuration", DATASET_ID, "-c", CONFIGURATION, "-tr", *MODEL_SELECTION, "-f", "0",
        "-np", "1", env=env)
    dataset_results = e2e_fold(env, STOCK).parents[1]
    information = json.loads((dataset_results / "inference_information.json").read_text())
    pairs = [name for name in information["all_results"] if name.startswith("ensemble___")]
    assert len(pairs) == len(MODEL_SELECTION) * (len(MODEL_SELECTION) - 1) // 2
    best = information["best_model_or_ensemble"]
    assert {m["trainer"] for m in best["selected_model_or_models"]} <= set(MODEL_SELECTION)
    members = [predicted_test_cases(env, trainer) for trainer in (OURS, PIXEL_RL)]  # as find_best's instructions say
    members.append(predicted_test_cases(env, MRL_SEG, MRL_SEG_CONFIGURATION))  # a 2d model in the 3d ensemble
    cli("nnUNetv2_ensemble", "-i", *map(str, members), "-o", str(tmp_path / "ensemble"), "-np", "1", env=env)
    cases = sorted(members[0].glob("*.nii.gz"))
    assert cases and [p.name for p in cases] == sorted(p.name for p in (tmp_path / "ensemble").glob("*.nii.gz"))
    for case in cases:  # the argmax of the three members' mean probabilities, summed in nnU-Net's order
        probabilities = sum(np.load(member / case.name.replace(".nii.gz", ".npz"))["probabilities"].astype(np.float32)
                            for member in members) / len(members)
        assert (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ensemble" / case.name))) ==
                probabilities.argmax(0)).all()
    for trainer in MODEL_SELECTION:
        apply_postprocessing(env, best["postprocessing_file"], e2e_fold(env, trainer).parent,
                             e2e_fold(env, trainer) / "validation", tmp_path / trainer)


def msd_subset(msd: Path, cases: int, folder: Path) -> Path:
    """An MSD task folder with the first ``cases`` training cases of ``msd`` (links to its files) and its
    dataset.json listing only those, as the MSD ships a task (its imagesTs empty)."""
    description = json.loads((msd / "dataset.json").read_text())
    description["training"] = description["training"][:cases]
    description["numTraining"] = cases
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True)
    for case in description["training"]:
        for key, sub in (("image", "imagesTr"), ("label", "labelsTr")):
            name = Path(case[key]).name
            (folder / sub / name).symlink_to(msd / sub / name)
    (folder / "dataset.json").write_text(json.dumps(description))
    return folder


@pytest.mark.skipif(not HIPPOCAMPUS.is_dir(), reason=f"real MSD data not found at {HIPPOCAMPUS} (../shared)")
def test_demo_quick_on_msd_hippocampus(tmp_path):
    """The demo's real-data path on 10 of the 60 Hippocampus cases (the whole task takes minutes more here, spent in
    nnU-Net's conversion, preprocessing and prediction, not in our code)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet")}
    msd = msd_subset(HIPPOCAMPUS, 10, tmp_path / "Task04_Hippocampus")
    result = subprocess.run([str(BIN / "nnunet-rl"), "demo", "--quick", "--msd", str(msd), "-device",
                             "cpu"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "nnU-Net's folder variables are unset" in result.stdout
    report = next((tmp_path / "nnunet_rl_data" / "results").glob("Dataset900_*/demo/comparison"))
    summary = json.loads((report / "summary.json").read_text())
    assert summary["trainers"] == ["nnUNetTrainer_3epochs_2iters", "nnUNetTrainerPAM_3epochs_2iters"]
    assert summary["classes"] == {"1": "Anterior", "2": "Posterior"}
    assert len(summary["cases"]) == 2  # the held-out fifth of 10 cases, predicted with nnUNetv2_predict


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_demo_quick_on_gpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet")}
    result = subprocess.run([str(BIN / "nnunet-rl"), "demo", "--quick", "-device", "cuda"], env=env, cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
