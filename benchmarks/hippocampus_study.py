"""AWSnet's parts on real data: stock nnU-Net, PAM, RLDeepSup, its random-search control and AWSnet on MSD Hippocampus.

One schedule for all (``_30epochs_50iters`` by default), fold 0, ``--repeats`` runs of each trainer (repeat r: plans
``nnUNetPlans_repeat<r>``, the same preprocessed data, DAS seeded with r; nnU-Net's own training is not seeded).
Every trainer predicts the cases held out of training (a fifth of the task, moved to imagesTs/labelsTs as the demo
does: no RL reward and no validation ever sees them) with ``nnUNetv2_predict``; ``nnunet-rl compare``'s metrics per
repeat; the table gives per-class Dice, mean ± sd over the repeats. A finished training is reused, an interrupted one
resumed with ``--c``: rerun the same command to continue.

    export nnUNet_raw=... nnUNet_preprocessed=... nnUNet_results=...
    python benchmarks/das_hippocampus_study.py --msd ../shared/data/Task04_Hippocampus -d 4 --repeats 2 -o study.md
"""
import argparse
import os
import statistics
from pathlib import Path

from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

from nnunet_rl.compare import compare_prediction_folders
from nnunet_rl.demo import convert_msd, nnunet_command, run
from nnunet_rl.errors import NnunetRLError
from nnunet_rl.nnunet_folders import dataset_name, require_nnunet_folders
from nnunet_rl.plans.planner import plan_rl
from nnunet_rl.plans.rl_block import RL_BLOCK_KEY

TRAINERS = ("nnUNetTrainer", "nnUNetTrainerPAM", "nnUNetTrainerRLDeepSup", "nnUNetTrainerRLDeepSup_randomSearch",
            "nnUNetTrainerAWSnet")
CONFIGURATION, FOLD = "3d_fullres", 0


def prepared_dataset(dataset_id: int, msd_folder: str) -> str:
    """The converted (a fifth held out) and planned task; converted and planned where missing."""
    try:
        name = dataset_name(dataset_id)
    except NnunetRLError:  # not converted yet
        name = convert_msd(Path(msd_folder).resolve(), dataset_id).name
    plan_rl(name, [CONFIGURATION])
    return name


def repeat_plans(name: str, repeat: int) -> str:
    """``nnUNetPlans_repeat<r>``: nnU-Net's plans with DAS seeded by ``repeat`` (same preprocessed data)."""
    folder = Path(os.environ["nnUNet_preprocessed"]) / name
    plans = load_json(str(folder / "nnUNetPlans.json"))
    plans["plans_name"] = f"nnUNetPlans_repeat{repeat}"
    plans["configurations"][CONFIGURATION][RL_BLOCK_KEY]["rl_deep_supervision"]["seed"] = repeat
    save_json(plans, str(folder / f"{plans['plans_name']}.json"), sort_keys=False)
    return plans["plans_name"]


def train_and_predict(name: str, trainer: str, plans: str, output: Path, device: str) -> Path:
    results = Path(os.environ["nnUNet_results"]) / name / f"{trainer}__{plans}__{CONFIGURATION}" / f"fold_{FOLD}"
    if not (results / "checkpoint_final.pth").is_file():
        command = [nnunet_command("nnUNetv2_train"), name, CONFIGURATION, str(FOLD), "-tr", trainer, "-p", plans,
                   "-device", device]
        run(command + (["--c"] if (results / "checkpoint_latest.pth").is_file() else []))
    raw = Path(os.environ["nnUNet_raw"]) / name
    predictions = output / plans / trainer
    run([nnunet_command("nnUNetv2_predict"), "-i", str(raw / "imagesTs"), "-o", str(predictions), "-d", name,
         "-c", CONFIGURATION, "-tr", trainer, "-p", plans, "-f", str(FOLD), "-device", device, "-npp", "1",
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
    parser.add_argument("--msd", required=True, help="MSD task folder (Task04_Hippocampus)")
    parser.add_argument("-d", type=int, default=4, help="dataset ID to convert into / reuse")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--schedule", default="_30epochs_50iters", help="trainer name suffix of the schedule")
    parser.add_argument("-device", default="cpu")
    parser.add_argument("-o", "--output", type=Path, default=Path("das_hippocampus_study.md"))
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ.setdefault("nnUNet_compile", "f")
        os.environ.setdefault("nnUNet_n_proc_DA", "1")
        os.environ.setdefault("nnUNet_def_n_proc", "2")
    require_nnunet_folders("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
    name = prepared_dataset(args.d, args.msd)
    trainers = [f"{trainer}{args.schedule}" for trainer in TRAINERS]
    study = Path(os.environ["nnUNet_results"]) / name / f"das_study{args.schedule}"
    raw = Path(os.environ["nnUNet_raw"]) / name
    summaries = []
    for repeat in range(args.repeats):
        plans = repeat_plans(name, repeat)
        predictions = {trainer: train_and_predict(name, trainer, plans, study, args.device) for trainer in trainers}
        report = compare_prediction_folders(predictions, raw / "labelsTs", load_json(str(raw / "dataset.json")),
                                            study / plans / "comparison")
        summaries.append(load_json(str(report / "summary.json")))
    args.output.write_text(table(summaries, trainers))
    print(args.output.read_text())


if __name__ == "__main__":
    main()
