"""nnU-Net's commands as a user types them, for the end-to-end tests: a user's shell, a command that must succeed,
a training killed with SIGKILL mid-run, export -> install -> Python API, model selection with postprocessing."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import SimpleITK as sitk

from helpers import NNUNET_FOLDERS

BIN = Path(sys.executable).parent


def user_environment(base: Path) -> dict:
    """A user's shell: nnU-Net's folders under ``base`` exported, CPU settings; discovery comes from the installed
    hook or the export `nnunet-rl env` prints."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet")}
    env.update({name: str(base / name) for name in NNUNET_FOLDERS})
    env.update(nnUNet_compile="f", nnUNet_n_proc_DA="1", nnUNet_def_n_proc="2")
    exports = subprocess.run([BIN / "nnunet-rl", "env"], env=env, capture_output=True, text=True, check=True).stdout
    env["nnUNet_extTrainer"] = exports.split('nnUNet_extTrainer="')[1].split('"')[0]
    return env


def cli(*command, env) -> str:
    result = subprocess.run([str(BIN / command[0]), *command[1:]], env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def fold_folder(env: dict, trainer: str, dataset_id: str, configuration: str) -> Path:
    """Fold 0 of ``trainer`` on nnUNetPlans in the results folder of ``env``."""
    dataset = next(Path(env["nnUNet_results"]).glob(f"Dataset{dataset_id}_*"))
    return dataset / f"{trainer}__nnUNetPlans__{configuration}" / "fold_0"


def train_until_second_epoch_then_kill(env: dict, trainer: str, dataset_id: str, configuration: str) -> None:
    """Start nnUNetv2_train on fold 0, wait until epoch 1 has started (epoch 0's checkpoint is written), kill -9 it."""
    process = subprocess.Popen([str(BIN / "nnUNetv2_train"), dataset_id, configuration, "0", "-tr", trainer,
                                "-device", "cpu", "--npz"], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    try:
        while time.time() < deadline and process.poll() is None:
            logs = list(fold_folder(env, trainer, dataset_id, configuration).glob("training_log_*.txt")) \
                if _results_exist(env, dataset_id) else []
            if logs and re.search(r": Epoch 1\s", logs[0].read_text()):
                break
            time.sleep(0.2)
        assert process.poll() is None, "training ended before it could be interrupted"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _results_exist(env: dict, dataset_id: str) -> bool:
    return any(Path(env["nnUNet_results"]).glob(f"Dataset{dataset_id}_*"))


def export_install_and_predict_with_the_api(env: dict, trainer: str, predictions: Path, tmp_path: Path, *,
                                           dataset_id: str, configuration: str,
                                           previous_stage: Path | None = None) -> None:
    """Exported as nnU-Net's zip, installed into a fresh results folder, predicting there through nnU-Net's Python
    API (a cascade stage from ``previous_stage``'s segmentations): the same model gives the same segmentations as
    ``predictions`` (nnUNetv2_predict in the training folder)."""
    archive = tmp_path / f"{trainer}.zip"
    cli("nnUNetv2_export_model_to_zip", "-d", dataset_id, "-o", str(archive), "-c", configuration, "-tr", trainer,
        "-f", "0", env=env)
    fresh = {**env, "nnUNet_results": str(tmp_path / "fresh_results")}
    cli("nnUNetv2_install_pretrained_model_from_zip", str(archive), env=fresh)
    raw = next(Path(env["nnUNet_raw"]).glob(f"Dataset{dataset_id}_*"))
    # the same computation as nnUNetv2_predict -device cpu gave ``predictions``: its thread count (one per core) and,
    # where it saved probabilities, the argmax of the softmax, not of the logits; otherwise an untrained network's
    # near-tied logits can round differently and flip a voxel (one of 32768 did, once)
    api = ("import multiprocessing, sys, torch\n"
           "from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor\n"
           "torch.set_num_threads(multiprocessing.cpu_count())\n"
           "predictor = nnUNetPredictor(device=torch.device('cpu'), perform_everything_on_device=False)\n"
           "predictor.initialize_from_trained_model_folder(sys.argv[1], use_folds=(0,))\n"
           "predictor.predict_from_files(sys.argv[2], sys.argv[3], save_probabilities=sys.argv[4] == 'True',\n"
           "                             num_processes_preprocessing=1, num_processes_segmentation_export=1,\n"
           "                             folder_with_segs_from_prev_stage=(sys.argv[5:] or [None])[0])\n")
    installed, output = fold_folder(fresh, trainer, dataset_id, configuration).parent, tmp_path / f"api_{trainer}"
    result = subprocess.run([sys.executable, "-c", api, str(installed), str(raw / "imagesTs"), str(output),
                             str(any(predictions.glob("*.npz"))), *([str(previous_stage)] if previous_stage else [])],
                            env=fresh, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = sorted(predictions.glob("*.nii.gz"))
    assert expected and [p.name for p in expected] == sorted(p.name for p in output.glob("*.nii.gz"))
    for predicted in expected:
        assert (sitk.GetArrayFromImage(sitk.ReadImage(str(output / predicted.name))) ==
                sitk.GetArrayFromImage(sitk.ReadImage(str(predicted)))).all()


def select_and_postprocess(env: dict, dataset_id: str, configuration: str, trainer: str, predictions: Path,
                           output: Path) -> None:
    """nnUNetv2_find_best_configuration on one model's fold-0 cross-validation (it selects that model and determines
    its postprocessing), then nnUNetv2_apply_postprocessing on ``predictions`` with what it determined, as its
    instructions say."""
    cli("nnUNetv2_find_best_configuration", dataset_id, "-c", configuration, "-tr", trainer, "-f", "0", "-np", "1",
        env=env)
    model = fold_folder(env, trainer, dataset_id, configuration).parent
    best = json.loads((model.parent / "inference_information.json").read_text())["best_model_or_ensemble"]
    assert best["selected_model_or_models"] == [
        {"configuration": configuration, "trainer": trainer, "plans_identifier": "nnUNetPlans"}]
    apply_postprocessing(env, best["postprocessing_file"], model, predictions, output)


def apply_postprocessing(env: dict, postprocessing_file: str, model: Path, segmentations: Path, output: Path) -> None:
    """nnUNetv2_apply_postprocessing on every segmentation in ``segmentations``: each comes out with voxels kept or
    set to background (nnU-Net's postprocessing only removes components), none missing."""
    cli("nnUNetv2_apply_postprocessing", "-i", str(segmentations), "-o", str(output), "-pp_pkl_file",
        postprocessing_file, "-np", "1", "-plans_json", str(model / "plans.json"), "-dataset_json",
        str(model / "dataset.json"), env=env)
    given = sorted(segmentations.glob("*.nii.gz"))
    assert given and [p.name for p in given] == sorted(p.name for p in output.glob("*.nii.gz"))
    for segmentation in given:
        before, after = (sitk.GetArrayFromImage(sitk.ReadImage(str(folder / segmentation.name)))
                         for folder in (segmentations, output))
        assert ((after == before) | (after == 0)).all()
