"""What the learning experiments on synthetic phantoms share: their own nnU-Net folders, in-process trainers, the
report.

``das_learning.py``, ``pixel_rl_learning.py`` and ``mrl_seg_learning.py`` run nnU-Net's training in this process (so
that they can wrap a trainer class with a control or a recorder) on a dataset they make and plan in a temporary folder.
"""
import argparse
import json
import os
import random
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from nnunet_rl.trainer_from_plans import trainer_from_plans
from nnunet_rl.trainers.base import RLTrainerBase


def planned_phantoms(base: Path, kind: str, dataset_id: int, configurations: list[str],
                     previous_stage_trainer: str | None = None, **make_options) -> str:
    """nnU-Net's folder variables set to folders under ``base`` (for this process), a ``make-dataset`` phantom dataset
    made there and planned for ``configurations`` by ``nnunet-rl plan`` (``--previous-stage-trainer``); its name."""
    from nnunet_rl.datasets.synthetic import make_dataset
    from nnunet_rl.nnunet_folders import NNUNET_FOLDER_VARIABLES
    from nnunet_rl.plans.planner import plan_rl
    for name in NNUNET_FOLDER_VARIABLES:
        (base / name).mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(base / name)
    folder = make_dataset(kind, dataset_id, **make_options)
    plan_rl(folder.name, configurations, previous_stage_trainer=previous_stage_trainer)
    return folder.name


def seeded_arm(arm: str, arms: dict, schedule: type, component: str, seed: int) -> type:
    """The class of arm ``arm`` (a trainer of ``arms``) on ``schedule`` (a ``ShortSchedule`` mixin), its component's
    ``seed`` (the action sampler) set to ``seed`` (stock nnU-Net's trainer: the schedule alone)."""
    trainer = arms[arm]
    if not issubclass(trainer, RLTrainerBase):  # stock nnU-Net: nothing to seed but torch, numpy and random
        return type(f"{trainer.__name__}_{schedule.__name__}", (schedule, trainer), {})
    return type(f"{trainer.__name__}_{schedule.__name__}_seed{seed}", (schedule, trainer),
                {"rl_overrides": {component: {**trainer.rl_overrides.get(component, {}), "seed": seed}}})


def trained(dataset: str, trainer_class: type, configuration: str, seed: int, fold: int = 0):
    """``trainer_class`` trained on the CPU (``fold``) with torch, numpy and random seeded by ``seed``."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    trainer = trainer_from_plans(dataset, trainer_class, configuration, fold)
    trainer.run_training()
    return trainer


def experiment_main(description: str, arms: dict, run, dataset_id: int, configuration: str) -> None:
    """The command line of a learning experiment on 2D ``imbalanced`` phantoms: ``--seeds``, ``--arms``, ``-o``;
    ``run(dataset, seeds, arms)`` gives the result, reported on stdout and in ``-o``."""
    os.environ.setdefault("nnUNet_compile", "f")
    os.environ.setdefault("nnUNet_n_proc_DA", "1")
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(arms), choices=list(arms))
    parser.add_argument("-o", "--output", type=Path)
    args = parser.parse_args()
    commit = source_commit()
    with tempfile.TemporaryDirectory() as base:
        result = run(planned_phantoms(Path(base), "imbalanced", dataset_id, [configuration], dim=2), args.seeds,
                     args.arms)
    report(result, args.output, commit)


def held_out_cases(dataset: str) -> tuple[dict, dict]:
    """The held-out cases of a ``make-dataset`` phantom (imagesTs, labelsTs): images with their properties as nnU-Net's
    reader gives them, and the reference label arrays, by case."""
    import SimpleITK as sitk
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    raw = Path(os.environ["nnUNet_raw"]) / dataset
    images = sorted((raw / "imagesTs").glob("*_0000.nii.gz"))
    cases = {image.name[:-len("_0000.nii.gz")]: SimpleITKIO().read_images([str(image)]) for image in images}
    references = {case: sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTs" / f"{case}.nii.gz")))
                  for case in cases}
    return cases, references


def cpu_predictor(trainer, network: torch.nn.Module, parameters: dict | None = None):
    """nnU-Net's predictor (Gaussian sliding window, the trainer's mirroring) on ``network`` with ``parameters`` (a
    state dict; default: the network's own now, which every prediction loads into ``network``), deep supervision
    switched off as ``nnUNetv2_predict`` builds it."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    network.decoder.deep_supervision = False
    predictor = nnUNetPredictor(perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(network, trainer.plans_manager, trainer.configuration_manager,
                                    [parameters or network.state_dict()], trainer.dataset_json, type(trainer).__name__,
                                    trainer.inference_allowed_mirroring_axes)
    return predictor


def mean_dice(segmentation: np.ndarray, reference: np.ndarray, labels) -> float:
    """Mean Dice over ``labels`` of one case."""
    from nnunet_rl.metrics import dice
    return float(np.mean([dice(segmentation == label, reference.reshape(segmentation.shape) == label)
                          for label in labels]))


def source_commit() -> str:
    """The repository's commit, with "+dirty" when tracked files differ from it ("unknown" outside a checkout): taken
    when an experiment starts, so that its result names the code it ran."""
    def git(*arguments: str) -> str:
        return subprocess.run(["git", *arguments], cwd=Path(__file__).parent, capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        return git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def report(result: dict, output: Path | None, commit: str) -> None:
    """The result, with the ``commit`` it ran at, as JSON on stdout, and in ``output`` when given."""
    result = {**result, "commit": commit}
    print(json.dumps(result, indent=2))
    if output:
        output.write_text(json.dumps(result, indent=2))
