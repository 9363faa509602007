"""Our trainers beside stock nnU-Net on real data (MSD Hippocampus), held-out Dice per class, mean ± sd over repeats.

``--study das`` (default): stock nnU-Net, PAM, RLDeepSup, its random-search control and AWSnet, 3d_fullres,
``_30epochs_50iters``. ``--study pixel_rl``: stock nnU-Net and PixelRL, 2d, ``_30epochs_50iters``. One schedule and
configuration for all trainers of a study, fold 0, ``--repeats`` runs of each trainer (repeat r: plans
``nnUNetPlans_repeat<r>``, the same preprocessed data, every RL component's ``seed`` set to r; nnU-Net's own training
is not seeded).
Every trainer predicts the cases held out of training (a fifth of the task, moved to imagesTs/labelsTs as the demo
does: no RL reward and no validation ever sees them) with ``nnUNetv2_predict``; ``nnunet-rl compare``'s metrics per
repeat; the table gives per-class Dice, mean ± sd over the repeats. A finished training is reused, an interrupted one
resumed with ``--c``: rerun the same command to continue.

    export nnUNet_raw=... nnUNet_preprocessed=... nnUNet_results=...
    python benchmarks/hippocampus_study.py --msd ../shared/data/Task04_Hippocampus -d 4 --repeats 2 -o study.md
    python benchmarks/hippocampus_study.py --study pixel_rl --msd ../shared/data/Task04_Hippocampus -d 4 --repeats 2
"""
import argparse
import os
import statistics
from pathlib import Path
from typing import NamedTuple

from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

from nnunet_rl.compare import compare_prediction_folders
from nnunet_rl.demo import convert_msd, nnunet_command, run
from nnunet_rl.errors import NnunetRLError
from nnunet_rl.nnunet_folders import dataset_name, require_nnunet_folders
from nnunet_rl.plans.planner import plan_rl
from nnunet_rl.plans.rl_block import RL_BLOCK_KEY

FOLD = 0


class Study(NamedTuple):
    trainers: tuple[str, ...]
    configuration: str
    schedule: str


STUDIES = {
    "das": Study(("nnUNetTrainer", "nnUNetTrainerPAM", "nnUNetTrainerRLDeepSup", "nnUNetTrainerRLDeepSup_randomSearch",
                  "nnUNetTrainerAWSnet"), "3d_fullres", "_30epochs_50iters"),
    "pixel_rl": Study(("nnUNetTrainer", "nnUNetTrainerPixelRL"), "2d", "_30epochs_50iters"),
}


def prepared_dataset(dataset_id: int, msd_folder: str, configuration: str) -> str:
    """The converted (a fifth held out) and planned task; converted and planned where missing."""
    try:
        name = dataset_name(dataset_id)
    except NnunetRLError:  # not converted yet
        name = convert_msd(Path(msd_folder).resolve(), dataset_id).name
    plan_rl(name, [configuration])
    return name


def repeat_plans(name: str, repeat: int, configuration: str) -> str:
    """``nnUNetPlans_repeat<r>``: nnU-Net's plans with every RL component seeded by ``repeat`` (same preprocessed
    data)."""
    folder = Path(os.environ["nnUNet_preprocessed"]) / name
    plans = load_json(str(folder / "nnUNetPlans.json"))
    plans["plans_name"] = f"nnUNetPlans_repeat{repeat}"
    for section in plans["configurations"][configuration][RL_BLOCK_KEY].values():
        if isinstance(section, dict) and "seed" in section:
            section["seed"] = repeat
    save_json(plans, str(folder / f"{plans['plans_name']}.json"), sort_keys=False)
    return plans["plans_name"]


def train_and_predict(name: str, trainer: str, plans: str, configuration: str, output: Path, device: str) -> Path:
    results = Path(os.environ["nnUNet_results"]) / name / f"{trainer}__{plans}__{configuration}" / f"fold_{FOLD}"
    if not (results / "checkpoint_final.pth").is_file():
        command = [nnunet_command("nnUNetv2_train"), name, configuration, str(FOLD), "-tr", trainer, "-p", plans,
                   "-device", device]
        run(command + (["--c"] if (results / "checkpoint_latest.pth").is_file() else []))
    raw = Path(os.environ["nnUNet_raw"]) / name
    predictions = output / plans / trainer
    run([nnunet_command("nnUNetv2_predict"), "-i", str(raw / "imagesTs"), "-o", str(predictions), "-d", name,
         "-c", configuration, "-tr", trainer, "-p", plans, "-f", str(FOLD), "-device", device, "-npp", "1",
         "-nps", "1"])
    return predictions


def table(summaries: list[dict], trainers: list[str]) -> str:
    classes = summaries[0]["classes"]
    lines = [f"Held-out Dice per class, mean ± sd over {len(summaries)} repeats "
             f"({len(summaries[0]['cases'])} held-out cases per repeat)", "",
             "| trainer | " + " | ".join(classes.values()) + " | mean |", "|---" * (len(classes) + 2) + "|"]
    for trainer in trainers:
        per_repeat = [[s["statistics"][trainer][label]["Dice"]["mean"] for label in classes] for s in summaries]
        columns = [list(values) for values in zip(*per_repeat)] + [[statistics.mean(r) for r in per_repeat]]
        cells = [f"{statistics.mean(c):.3f} ± {statistics.stdev(c):.3f}" if len(c) > 1 else f"{c[0]:.3f}"
                 for c in columns]
        lines.append(f"| {trainer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", default="das", choices=list(STUDIES))
    parser.add_argument("--msd", required=True, help="MSD task folder (Task04_Hippocampus)")
    parser.add_argument("-d", type=int, default=4, help="dataset ID to convert into / reuse")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--schedule", help="trainer name suffix of the schedule (default: the study's)")
    parser.add_argument("-device", default="cpu")
    parser.add_argument("-o", "--output", type=Path, help="default: <study>_hippocampus_study.md")
    args = parser.parse_args()
    study = STUDIES[args.study]
    schedule = args.schedule or study.schedule
    output = args.output or Path(f"{args.study}_hippocampus_study.md")
    if args.device == "cpu":
        os.environ.setdefault("nnUNet_compile", "f")
        os.environ.setdefault("nnUNet_n_proc_DA", "1")
        os.environ.setdefault("nnUNet_def_n_proc", "2")
    require_nnunet_folders("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
    name = prepared_dataset(args.d, args.msd, study.configuration)
    trainers = [f"{trainer}{schedule}" for trainer in study.trainers]
    folder = Path(os.environ["nnUNet_results"]) / name / f"{args.study}_study{schedule}"
    raw = Path(os.environ["nnUNet_raw"]) / name
    summaries = []
    for repeat in range(args.repeats):
        plans = repeat_plans(name, repeat, study.configuration)
        predictions = {trainer: train_and_predict(name, trainer, plans, study.configuration, folder, args.device)
                       for trainer in trainers}
        report = compare_prediction_folders(predictions, raw / "labelsTs", load_json(str(raw / "dataset.json")),
                                            folder / plans / "comparison")
        summaries.append(load_json(str(report / "summary.json")))
    output.write_text(table(summaries, trainers))
    print(output.read_text())


if __name__ == "__main__":
    main()
