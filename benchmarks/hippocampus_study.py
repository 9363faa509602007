"""Our trainers beside stock nnU-Net on real data (MSD Hippocampus), held-out Dice per class, mean ± sd over repeats.

``--study das`` (default): stock nnU-Net, PAM, RLDeepSup, its random-search control and AWSnet, 3d_fullres,
``_30epochs_50iters``. ``--study voxel_agents``: stock nnU-Net, PixelRL and MRL-Seg, 2d, ``_30epochs_50iters``
(the per-voxel agents train on 2d: on a CPU the backward pass of PixelRL's dilated 3D heads takes seconds per layer,
docs/pixel_rl.md). One schedule and
configuration for all trainers of a study, fold 0, ``--repeats`` runs of each trainer (repeat r: plans
``nnUNetPlans_repeat<r>``, the same preprocessed data, every RL component's ``seed`` set to r; nnU-Net's own training
is not seeded).
Every trainer predicts the cases held out of training (a fifth of the task, moved to imagesTs/labelsTs as the demo
does: no RL reward and no validation ever sees them) with ``nnUNetv2_predict``; ``nnunet-rl compare``'s metrics of
each (repeat, trainer) are recorded as ``<record>/<plans>__<trainer>__<configuration>.json`` (dataset, held-out
cases, Dice per class); the table gives per-class Dice, mean ± sd over every recorded repeat of each trainer on the
dataset. A recorded training is skipped, a finished one reused, an interrupted one resumed with ``--c``: rerun the
same command to continue. ``--trainers`` runs a subset (two processes with different subsets share the work; start
the second once the first has planned).

    export nnUNet_raw=... nnUNet_preprocessed=... nnUNet_results=...
    python benchmarks/hippocampus_study.py --msd ../shared/data/Task04_Hippocampus -d 4 --repeats 2 \
        --record benchmarks/results/hippocampus_das -o study.md
    python benchmarks/hippocampus_study.py --study voxel_agents --msd ../shared/data/Task04_Hippocampus -d 4 \
        --repeats 2 --record benchmarks/results/hippocampus_voxel_agents -o voxel_agents.md

The repeat plans seed every configuration's RL components, so two studies run side by side on one dataset write the
same ``nnUNetPlans_repeat<r>`` files once both have planned (until then the second to plan rewrites them, with its
configuration's rl block added and the first one's unchanged).
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
REPEAT_PLANS = "nnUNetPlans_repeat"


class Study(NamedTuple):
    trainers: tuple[str, ...]
    configuration: str
    schedule: str


STUDIES = {
    "das": Study(("nnUNetTrainer", "nnUNetTrainerPAM", "nnUNetTrainerRLDeepSup", "nnUNetTrainerRLDeepSup_randomSearch",
                  "nnUNetTrainerAWSnet"), "3d_fullres", "_30epochs_50iters"),
    "voxel_agents": Study(("nnUNetTrainer", "nnUNetTrainerPixelRL", "nnUNetTrainerMRLSeg"), "2d", "_30epochs_50iters"),
}


def prepared_dataset(dataset_id: int, msd_folder: str, configuration: str) -> str:
    """The converted (a fifth held out) and planned task; converted and planned where missing."""
    try:
        name = dataset_name(dataset_id)
    except NnunetRLError:  # not converted yet
        name = convert_msd(Path(msd_folder).resolve(), dataset_id).name
    plan_rl(name, [configuration])
    return name


def repeat_plans(name: str, repeat: int) -> str:
    """``nnUNetPlans_repeat<r>``: nnU-Net's plans with every RL component of every configuration seeded by
    ``repeat`` (same preprocessed data)."""
    folder = Path(os.environ["nnUNet_preprocessed"]) / name
    plans = load_json(str(folder / "nnUNetPlans.json"))
    plans["plans_name"] = f"{REPEAT_PLANS}{repeat}"
    for configuration in plans["configurations"].values():
        for section in configuration.get(RL_BLOCK_KEY, {}).values():
            if isinstance(section, dict) and "seed" in section:
                section["seed"] = repeat
    file = folder / f"{plans['plans_name']}.json"
    if not file.is_file() or load_json(str(file)) != plans:
        # rewritten when the plans change, e.g. when a second study adds its configuration's rl block: whole or not
        # at all (os.replace), since a training of the other study may be starting and reading it
        partial = file.with_name(f"{file.name}.partial")
        save_json(plans, str(partial), sort_keys=False)
        os.replace(partial, file)
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


def record_file(record: Path, repeat: int | str, trainer: str, configuration: str) -> Path:
    """``<record>/<plans>__<trainer>__<configuration>.json``; ``repeat`` ``"*"`` makes it a pattern of every repeat."""
    return record / f"{REPEAT_PLANS}{repeat}__{trainer}__{configuration}.json"


def record_metrics(name: str, trainer: str, plans: str, configuration: str, predictions: Path, output: Path) -> dict:
    """What one (repeat, trainer) gives: the held-out cases and their mean Dice per class (``nnunet-rl compare``)."""
    raw = Path(os.environ["nnUNet_raw"]) / name
    report = compare_prediction_folders({trainer: predictions}, raw / "labelsTs", load_json(str(raw / "dataset.json")),
                                        output)
    summary = load_json(str(report / "summary.json"))
    return {"dataset": name, "trainer": trainer, "plans": plans, "configuration": configuration,
            "cases": summary["cases"], "classes": summary["classes"],
            "dice": {label: summary["statistics"][trainer][label]["Dice"]["mean"] for label in summary["classes"]}}


def save_record(record: dict, file: Path) -> None:
    """Written whole or not at all: another process of the study may be reading the folder."""
    file.parent.mkdir(parents=True, exist_ok=True)
    partial = file.with_name(f"{file.name}.partial")
    save_json(record, str(partial))
    os.replace(partial, file)


def recorded_runs(record: Path, name: str, trainer: str, configuration: str) -> list[dict]:
    """Every recorded repeat of ``trainer`` on dataset ``name``."""
    runs = [load_json(str(file)) for file in sorted(record.glob(record_file(record, "*", trainer, configuration).name))]
    return [run for run in runs if (run["dataset"], run["trainer"]) == (name, trainer)]


def table(records: dict[str, list[dict]]) -> str:
    """Per trainer, Dice per class and their mean: mean ± sd over its recorded repeats (n in the last column)."""
    recorded = [run for runs in records.values() for run in runs]
    if not recorded:
        return "No training of the study is recorded yet.\n"
    classes = recorded[0]["classes"]
    cases = sorted({len(run["cases"]) for run in recorded})
    lines = [f"Held-out Dice per class ({'/'.join(map(str, cases))} held-out cases), mean ± sd over the recorded "
             "repeats", "",
             "| trainer | " + " | ".join(classes.values()) + " | mean | repeats |", "|---" * (len(classes) + 3) + "|"]
    for trainer, runs in records.items():
        if not runs:
            lines.append(f"| {trainer} |" + " |" * (len(classes) + 1) + " 0 |")
            continue
        per_repeat = [[run["dice"][label] for label in classes] for run in runs]
        columns = [list(values) for values in zip(*per_repeat)] + [[statistics.mean(r) for r in per_repeat]]
        cells = [f"{statistics.mean(c):.3f} ± {statistics.stdev(c):.3f}" if len(c) > 1 else f"{c[0]:.3f}"
                 for c in columns]
        lines.append(f"| {trainer} | " + " | ".join(cells) + f" | {len(runs)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", default="das", choices=list(STUDIES))
    parser.add_argument("--msd", required=True, help="MSD task folder (Task04_Hippocampus)")
    parser.add_argument("-d", type=int, default=4, help="dataset ID to convert into / reuse")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--trainers", nargs="+", help="a subset of the study's trainers, without the schedule suffix")
    parser.add_argument("--schedule", help="trainer name suffix of the schedule (default: the study's)")
    parser.add_argument("--record", type=Path, help="folder of the per-training metrics (default: in nnUNet_results)")
    parser.add_argument("-device", default="cpu")
    parser.add_argument("-o", "--output", type=Path, help="default: <study>_hippocampus_study.md")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    study = STUDIES[args.study]
    unknown = sorted(set(args.trainers or ()) - set(study.trainers))
    if unknown:
        parser.error(f"not trainers of the {args.study} study: {', '.join(unknown)} "
                     f"(it has {', '.join(study.trainers)})")
    schedule = args.schedule or study.schedule
    output = args.output or Path(f"{args.study}_hippocampus_study.md")
    if args.device == "cpu":
        os.environ.setdefault("nnUNet_compile", "f")
        os.environ.setdefault("nnUNet_n_proc_DA", "1")
        os.environ.setdefault("nnUNet_def_n_proc", "2")
    require_nnunet_folders("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
    name = prepared_dataset(args.d, args.msd, study.configuration)
    folder = Path(os.environ["nnUNet_results"]) / name / f"{args.study}_study{schedule}"
    record = args.record or folder / "records"
    for repeat in range(args.repeats):
        plans = repeat_plans(name, repeat)
        for trainer in [f"{trainer}{schedule}" for trainer in args.trainers or study.trainers]:
            file = record_file(record, repeat, trainer, study.configuration)
            if not file.is_file():
                predictions = train_and_predict(name, trainer, plans, study.configuration, folder, args.device)
                save_record(record_metrics(name, trainer, plans, study.configuration, predictions,
                                           folder / plans / f"metrics_{trainer}"), file)
    records = {trainer: recorded_runs(record, name, trainer, study.configuration)
               for trainer in [f"{trainer}{schedule}" for trainer in study.trainers]}
    output.write_text(table(records))
    print(output.read_text())


if __name__ == "__main__":
    main()
