"""``nnunet-rl demo``: the whole nnU-Net workflow with our trainers beside stock nnU-Net, through nnU-Net's CLI.

make (or convert) a dataset -> ``nnunet-rl plan`` (nnU-Net planning + preprocessing) -> ``nnUNetv2_train``
stock and ours on fold 0 -> ``nnUNetv2_predict`` on held-out cases -> comparison report.

On the synthetic two-modality dataset (its MRI turned by a known rotation) ours is ``nnUNetTrainerRLU2Net``, and the
demo draws what its PoseAlign agents learned: each module's probability on the rotation that undoes the known one,
per epoch. On a single-channel MSD task (RL-U2Net needs two modalities) ours is ``nnUNetTrainerPAM``.
"""
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

from nnunet_rl.compare import compare_prediction_folders
from nnunet_rl.datasets.common import free_dataset_id
from nnunet_rl.datasets.synthetic import make_dataset
from nnunet_rl.discovery import register_ext_trainer
from nnunet_rl.errors import NnunetRLError
from nnunet_rl.nnunet_folders import NNUNET_FOLDER_VARIABLES
from nnunet_rl.plans.planner import plan_rl
from nnunet_rl.rotations import cube_rotations
from nnunet_rl.trainers.schedules import Demo, Smoke

DEMO_DATA_FOLDER = "nnunet_rl_data"  # git-ignored, in the working directory, used when nnU-Net's folders are unset
FIRST_DEMO_ID = 900
CONFIGURATION = "3d_fullres"
FOLD = 0
SCHEDULES = {"quick": Smoke.suffix, "full": Demo.suffix}
OURS = {"synthetic": "nnUNetTrainerRLU2Net", "msd": "nnUNetTrainerPAM"}
POLICY_FIGURE = "pose_align_policy.png"
NEEDED_ROTATION_KEY = "/needed_rotation_probability"  # rl_u2net/<module>/... in nnU-Net's checkpointed log
SYNTHETIC_SIZE = {"quick": dict(cases=8, size=32), "full": dict(cases=16, size=32)}
MSD_HELD_OUT_FRACTION = 0.2


class DemoSteps:
    """Numbered step headers with elapsed time, so a long run shows where it is."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.time()

    def next(self, what: str) -> None:
        self.done += 1
        print(f"\n[nnunet-rl demo {self.done}/{self.total}, {time.time() - self.start:.0f} s] {what}", flush=True)


def use_nnunet_folders() -> bool:
    """Use nnU-Net's folder variables when set; otherwise folders under ./nnunet_rl_data. True if the user's."""
    missing = [name for name in NNUNET_FOLDER_VARIABLES if name not in os.environ]
    if len(missing) < len(NNUNET_FOLDER_VARIABLES) and missing:
        raise NnunetRLError(f"set all of {', '.join(NNUNET_FOLDER_VARIABLES)} or none of them (missing: {missing})")
    if not missing:
        return True
    base = Path.cwd() / DEMO_DATA_FOLDER
    for name, sub in zip(NNUNET_FOLDER_VARIABLES, ("raw", "preprocessed", "results")):
        os.environ[name] = str(base / sub)
        (base / sub).mkdir(parents=True, exist_ok=True)
    print(f"nnU-Net's folder variables are unset: the demo uses {base}/{{raw,preprocessed,results}}")
    return False


def demo_dataset_id(users_folders: bool) -> int:
    """A free ID in the user's folders; in our own demo folder, the demo's ID is reused and its old data removed."""
    if users_folders:
        return free_dataset_id(FIRST_DEMO_ID)
    for name in NNUNET_FOLDER_VARIABLES:
        for old in Path(os.environ[name]).glob(f"Dataset{FIRST_DEMO_ID:03d}_*"):
            shutil.rmtree(old)
    return FIRST_DEMO_ID


def nnunet_command(name: str) -> str:
    """An nnU-Net console script of this Python environment (works without an activated venv)."""
    beside_python = Path(sys.executable).parent / name
    found = str(beside_python) if beside_python.exists() else shutil.which(name)
    if found is None:
        raise NnunetRLError(f"{name} not found: is nnunetv2 installed in this environment?")
    return found


def run(command: list[str]) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def hold_out_cases(raw_folder: Path, fraction: float) -> None:
    """Move the last ``fraction`` of training cases to imagesTs/labelsTs (MSD tasks ship no test labels)."""
    dataset_json = load_json(str(raw_folder / "dataset.json"))
    ending = dataset_json["file_ending"]
    cases = sorted(f.name[:-len(ending)] for f in (raw_folder / "labelsTr").glob(f"*{ending}"))
    held_out = cases[-max(2, int(len(cases) * fraction)):]
    for sub in ("imagesTs", "labelsTs"):
        shutil.rmtree(raw_folder / sub, ignore_errors=True)
        (raw_folder / sub).mkdir()
    for case in held_out:
        for image in (raw_folder / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9]{ending}"):
            image.rename(raw_folder / "imagesTs" / image.name)
        (raw_folder / "labelsTr" / f"{case}{ending}").rename(raw_folder / "labelsTs" / f"{case}{ending}")
    dataset_json["numTraining"] = len(cases) - len(held_out)
    save_json(dataset_json, str(raw_folder / "dataset.json"), sort_keys=False)


def convert_msd(msd_folder: Path, dataset_id: int) -> Path:
    from nnunetv2.dataset_conversion.convert_MSD_dataset import convert_msd_dataset
    if not (msd_folder / "dataset.json").is_file():
        raise NnunetRLError(f"{msd_folder} is not an MSD task folder (no dataset.json)")
    convert_msd_dataset(str(msd_folder), overwrite_target_id=dataset_id, num_processes=1)
    raw_folder = next(Path(os.environ["nnUNet_raw"]).glob(f"Dataset{dataset_id:03d}_*"))
    hold_out_cases(raw_folder, MSD_HELD_OUT_FRACTION)
    return raw_folder


def run_demo(quick: bool = False, msd_folder: str | None = None, device: str | None = None) -> Path:
    """Run the demo; returns the folder with the comparison report."""
    schedule = "quick" if quick else "full"
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        os.environ.setdefault("nnUNet_compile", "f")
        os.environ.setdefault("nnUNet_n_proc_DA", "1")
        os.environ.setdefault("nnUNet_def_n_proc", str(os.cpu_count()))  # nnU-Net's 8 spawned exporters swamp a CPU
    register_ext_trainer()
    trainers = [f"{trainer}{SCHEDULES[schedule]}" for trainer in ("nnUNetTrainer",
                                                                   OURS["msd" if msd_folder else "synthetic"])]
    steps = DemoSteps(3 + 2 * len(trainers))

    users_folders = use_nnunet_folders()
    dataset_id = demo_dataset_id(users_folders)
    if msd_folder:
        steps.next(f"converting {msd_folder} with nnU-Net's MSD converter into Dataset{dataset_id:03d}")
        raw_folder = convert_msd(Path(msd_folder).resolve(), dataset_id)
    else:
        steps.next(f"making a synthetic two-modality heart dataset (its MRI turned by a known rotation), "
                   f"Dataset{dataset_id:03d}")
        raw_folder = make_dataset("multimodal", dataset_id, rotate_aux="fixed", **SYNTHETIC_SIZE[schedule])
    dataset = raw_folder.name

    steps.next("nnU-Net planning and preprocessing, plus the rl block (nnunet-rl plan)")
    plan_rl(dataset, [CONFIGURATION])

    results = Path(os.environ["nnUNet_results"]) / dataset / "demo"
    for trainer in trainers:
        steps.next(f"training {trainer} (fold {FOLD}) with nnUNetv2_train on {device}")
        run([nnunet_command("nnUNetv2_train"), dataset, CONFIGURATION, str(FOLD), "-tr", trainer,
             "-device", device])
        steps.next(f"predicting the held-out cases with {trainer} (nnUNetv2_predict)")
        run([nnunet_command("nnUNetv2_predict"), "-i", str(raw_folder / "imagesTs"), "-o",
             str(results / trainer), "-d", dataset, "-c", CONFIGURATION, "-tr", trainer, "-f", str(FOLD),
             "-device", device, "-npp", "1", "-nps", "1"])

    steps.next("comparing with stock nnU-Net on the held-out cases")
    report = compare_prediction_folders({t: results / t for t in trainers}, raw_folder / "labelsTs",
                                        load_json(str(raw_folder / "dataset.json")), results / "comparison")
    print(dice_summary(load_json(str(report / "summary.json"))))
    ours = Path(os.environ["nnUNet_results"]) / dataset / f"{trainers[1]}__nnUNetPlans__{CONFIGURATION}" / \
        f"fold_{FOLD}"
    history = policy_history(ours / "checkpoint_final.pth")
    if history:
        print(plot_policy_history(history, report / POLICY_FIGURE))
    print(f"demo finished in {time.time() - steps.start:.0f} s; report (every metric, per case, Wilcoxon tests) in "
          f"{report / 'report.md'}")
    return report


def dice_summary(summary: dict) -> str:
    """Mean held-out Dice per class (rows) and trainer (columns), from ``nnunet-rl compare``'s summary.json."""
    trainers = summary["trainers"]
    lines = [f"\nheld-out Dice, mean over {len(summary['cases'])} cases", "| class | " + " | ".join(trainers) + " |",
             "|---|" + "---:|" * len(trainers)]
    for label, name in summary["classes"].items():
        cells = [f"{summary['statistics'][trainer][label]['Dice']['mean']:.3f}" for trainer in trainers]
        lines.append(f"| {label} {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def policy_history(checkpoint_file: Path) -> dict[str, dict[str, list[float]]]:
    """From RL-U2Net's checkpointed log: per PoseAlign module, its probability on the rotation it needs per epoch
    (``probability``) and the PPO reward per epoch (``reward``: NaN outside the RL phase). Empty for other trainers
    and for datasets without a known rotation."""
    logging = torch.load(checkpoint_file, map_location="cpu", weights_only=False)["logging"]
    reward = list(logging.get("rl_u2net/reward", []))
    return {key[len("rl_u2net/"):-len(NEEDED_ROTATION_KEY)]: {"probability": list(values), "reward": reward}
            for key, values in logging.items() if key.endswith(NEEDED_ROTATION_KEY)}


def plot_policy_history(history: dict[str, dict[str, list[float]]], filename: Path) -> str:
    """Draw :func:`policy_history` (chance level and RL phase marked) to ``filename``; a one-paragraph summary."""
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    chance = 1 / len(cube_rotations(3))
    rl_epochs = sum(1 for value in next(iter(history.values()))["reward"] if math.isfinite(value))
    rl_phase = f"{rl_epochs} epoch{'s' * (rl_epochs != 1)}"
    fig, ax = plt.subplots(figsize=(9, 5))
    for module, series in history.items():
        ax.plot(range(len(series["probability"])), series["probability"], marker="o", label=module)
    ax.axhline(chance, linestyle="--", color="grey", label=f"chance (1/{round(1 / chance)})")
    ax.axvspan(-0.5, rl_epochs - 0.5, color="tab:green", alpha=0.1, label=f"RL phase ({rl_phase})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("policy's probability on the rotation\nthat undoes the known misalignment")
    ax.set_ylim(0, 1)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(filename, dpi=100)
    plt.close(fig)
    moves = ", ".join(f"{module} {series['probability'][0]:.3f} → {series['probability'][-1]:.3f}"
                      for module, series in history.items())
    return (f"\nRL-U2Net's PoseAlign agents, probability on the rotation that undoes the known misalignment, first → "
            f"last epoch (chance {chance:.3f}; RL phase {rl_phase}, where a default nnU-Net run has 200 with a "
            f"PPO round each): {moves}. "
            f"Figure: {filename}")
