"""RL-U2Net's learning experiment (issue items 1-4) through nnU-Net's own commands, as a user would run it.

Qu and Zhao, "RL-U2Net: A Dual-Branch UNet with Reinforcement Learning-Assisted Multimodal Feature Fusion for
Accurate 3D Whole-Heart Segmentation" (preprint, no DOI): PoseAlign (eq. 6) and its PPO (eqs. 8-13).

For each seed and each kind of phantom dataset (``make-dataset --kind multimodal``):

- ``quarter``: the MRI channel turned by a 90° turn about an axis (it does not commute with axis flips);
- ``half``: turned by a 180° turn about an axis (it commutes with axis flips);
- ``none``: co-registered;

it plans with ``nnunet-rl plan`` (the rl block's defaults), trains fold 0 of ``nnUNetTrainerRLU2Net``,
``_noPPO`` and ``_noRLXAlign`` (``--schedule`` picks the short-schedule variants) with ``nnUNetv2_train``, predicts
the held-out cases with ``nnUNetv2_predict`` (RL-U2Net also with ``--disable_tta``), and records per run: the
smallest probability any module's policy puts on the rotation it needs (the primary branch the inverse of the
dataset's, the auxiliary branch the dataset's own; identity on ``none``), whether every module applies that rotation
at inference (``applied_index``), and each trainer's mean foreground Dice on the held-out cases. The dataset's seed
picks its rotation, so seeds are searched in order until each kind has ``--seeds`` datasets.

    export nnUNet_raw=... nnUNet_preprocessed=... nnUNet_results=...
    python benchmarks/rl_u2net_experiment.py --seeds 3 --schedule full -device cuda -o rl_u2net_experiment.md
"""
import argparse
import json
import shutil
import sys
from itertools import count
from pathlib import Path

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunet_rl.compare import compare_prediction_folders
from nnunet_rl.datasets.common import free_dataset_id
from nnunet_rl.datasets.synthetic import make_dataset, needed_rotations
from nnunet_rl.demo import nnunet_command, run
from nnunet_rl.nnunet_folders import NNUNET_FOLDER_VARIABLES, require_nnunet_folders
from nnunet_rl.plans.planner import plan_rl
from nnunet_rl.rotations import cube_rotations
from nnunet_rl.trainers.schedules import Demo, Smoke

CONFIGURATION, FOLD, FIRST_ID = "3d_fullres", 0, 960
SCHEDULES = {"full": "", "demo": Demo.suffix, "quick": Smoke.suffix}
TRAINERS = ("nnUNetTrainerRLU2Net", "nnUNetTrainerRLU2Net_noPPO", "nnUNetTrainerRLU2Net_noRLXAlign")
KINDS = ("quarter", "half", "none")


def rotation_kind(index: int) -> str | None:
    """``half`` for a 180° turn about an axis (trace −1, diagonal), ``quarter`` for a 90° turn about one (trace
    1 + 2·cos 90° = 1), None for the identity and the other rotations of the cube."""
    matrix = cube_rotations(3)[index]
    if np.trace(matrix) == 1:
        return "quarter"
    return "half" if np.trace(matrix) == -1 and np.count_nonzero(matrix - np.diag(np.diag(matrix))) == 0 else None


def datasets(kind: str, wanted: int, cases: int) -> list[Path]:
    """``wanted`` datasets of one kind (raw folders), made with seeds 0, 1, ... until there are enough."""
    found = []
    for seed in count():
        folder = make_dataset("multimodal", free_dataset_id(FIRST_ID), cases=cases,
                              rotate_aux="none" if kind == "none" else "fixed", seed=seed)
        record = load_json(str(folder / "dataset.json")).get("nnunet_rl", {}).get("aux_rotation")
        if kind == "none" or rotation_kind(record["index"]) == kind:
            found.append(folder)
            if len(found) == wanted:
                return found
        else:
            shutil.rmtree(folder)
    raise AssertionError("unreachable")


def policy_outcome(policy_file: Path, dataset_json: dict) -> tuple[float, bool]:
    """The smallest probability of a module on the rotation it needs, and whether every module applies it."""
    needed = needed_rotations(dataset_json) or {"primary": 0, "auxiliary": 0}
    modules = json.loads(policy_file.read_text())["modules"].values()
    probabilities = [next(r["probability"] for r in m["rotations"] if r["index"] == needed[m["receiving_branch"]])
                     for m in modules]
    return min(probabilities), all(m["applied_index"] == needed[m["receiving_branch"]] for m in modules)


def mean_dice(summary_file: Path, trainer: str) -> float:
    statistics = load_json(str(summary_file))["statistics"][trainer]
    return float(np.mean([per_class["Dice"]["mean"] for per_class in statistics.values()]))


def run_one(folder: Path, suffix: str, device: str, results: Path) -> dict:
    """Plan, train the three trainers, predict (RL-U2Net with and without test-time mirroring), score."""
    name = folder.name
    plan_rl(name, [CONFIGURATION])
    predictions = {}
    for trainer in (f"{t}{suffix}" for t in TRAINERS):
        run([nnunet_command("nnUNetv2_train"), name, CONFIGURATION, str(FOLD), "-tr", trainer, "-device", device])
        for tta in (True, False) if trainer.startswith(f"{TRAINERS[0]}{suffix}") else (True,):
            label = trainer if tta else f"{trainer} (no TTA)"
            output = results / name / "rl_u2net_experiment" / label.replace(" ", "_")
            run([nnunet_command("nnUNetv2_predict"), "-i", str(folder / "imagesTs"), "-o", str(output), "-d", name,
                 "-c", CONFIGURATION, "-tr", trainer, "-f", str(FOLD), "-device", device]
                + ([] if tta else ["--disable_tta"]))
            predictions[label] = output
    report = compare_prediction_folders(predictions, folder / "labelsTs", load_json(str(folder / "dataset.json")),
                                        results / name / "rl_u2net_experiment" / "comparison")
    ours = f"{TRAINERS[0]}{suffix}"
    probability, applied = policy_outcome(
        results / name / f"{ours}__nnUNetPlans__{CONFIGURATION}" / f"fold_{FOLD}" / "rl_policy.json",
        load_json(str(folder / "dataset.json")))
    return {"probability": probability, "applied": applied,
            "dice": {label: mean_dice(report / "summary.json", label) for label in predictions}}


def table(outcomes: dict[str, list[dict]], suffix: str) -> str:
    def mean_sd(values):
        return f"{np.mean(values):.3f} ± {np.std(values):.3f}"

    labels = [f"{TRAINERS[0]}{suffix}", f"{TRAINERS[0]}{suffix} (no TTA)", *(f"{t}{suffix}" for t in TRAINERS[1:])]
    lines = ["| phantoms | runs | min π on the needed rotation (mean ± sd) | runs applying it | "
             + " | ".join(f"Dice {label}" for label in labels) + " |",
             "|---|---:|---|---:|" + "---|" * len(labels)]
    for kind, runs in outcomes.items():
        lines.append(f"| {kind} | {len(runs)} | {mean_sd([r['probability'] for r in runs])} | "
                     f"{sum(r['applied'] for r in runs)}/{len(runs)} | "
                     + " | ".join(mean_sd([r["dice"][label] for r in runs]) for label in labels) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="datasets per kind (default 3)")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--schedule", choices=list(SCHEDULES), default="full")
    parser.add_argument("--cases", type=int, default=16, help="training cases per dataset (default 16)")
    parser.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"])
    parser.add_argument("-o", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    _, _, results = require_nnunet_folders(*NNUNET_FOLDER_VARIABLES)
    suffix = SCHEDULES[args.schedule]
    outcomes = {kind: [run_one(folder, suffix, args.device, results)
                       for folder in datasets(kind, args.seeds, args.cases)] for kind in args.kinds}
    text = table(outcomes, suffix)
    print(text)
    if args.o:
        Path(args.o).write_text(text)


if __name__ == "__main__":
    sys.exit(main())
