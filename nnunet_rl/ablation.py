"""``nnunet-rl ablation``: RL-U2Net's ablation (Qu and Zhao, Table 2) and λ sweep (Fig. 9) with nnU-Net's own tools.

Each variant is trained by ``nnUNetv2_train`` unless its fold already holds a finished training (checkpoint_final.pth
and nnU-Net's validation predictions), then all are compared on the fold's validation cases by
:func:`nnunet_rl.compare.compare_trainers` (stock ``nnUNetTrainer`` first, as the reference). ``table2.md`` lays the
result out like the paper's Table 2: one row per variant, mean foreground Dice and HD95.
"""
from collections.abc import Sequence
from pathlib import Path

from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunet_rl.compare import compare_trainers
from nnunet_rl.demo import nnunet_command, run
from nnunet_rl.errors import NnunetRLError
from nnunet_rl.nnunet_folders import dataset_name as nnunet_dataset_name, require_nnunet_folders
from nnunet_rl.trainers.rl_u2net import nnUNetTrainerRLU2Net
from nnunet_rl.trainers.rl_u2net_variants import ABLATIONS, LAMBDA_SWEEP
from nnunet_rl.trainers.schedules import Demo, Smoke

SCHEDULES = {"full": "", "demo": Demo.suffix, "quick": Smoke.suffix}
STOCK = "nnUNetTrainer"


def variant_name(trainer: type) -> str:
    """``noPPO`` for ``nnUNetTrainerRLU2Net_noPPO``: how ``--variants`` names an ablation."""
    return trainer.__name__.removeprefix(f"{nnUNetTrainerRLU2Net.__name__}_")


VARIANTS = [variant_name(trainer) for trainer in ABLATIONS.values() if trainer is not nnUNetTrainerRLU2Net]


def ablation_trainers(schedule: str, sweep: bool, variants: Sequence[str] | None = None) -> dict[str, str]:
    """Row label -> trainer name, stock nnU-Net first, then RL-U2Net and the ablations (only ``variants`` if given)."""
    unknown = sorted(set(variants or ()) - set(VARIANTS))
    if unknown:
        raise NnunetRLError(f"unknown ablation variants: {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    suffix = SCHEDULES[schedule]
    rows = {"nnU-Net (stock)": f"{STOCK}{suffix}",
            **{label: f"{trainer.__name__}{suffix}" for label, trainer in ABLATIONS.items()
               if trainer is nnUNetTrainerRLU2Net or variants is None or variant_name(trainer) in variants}}
    if sweep:
        rows.update({f"λ = {value}": f"{trainer.__name__}{suffix}" for value, trainer in LAMBDA_SWEEP.items()})
    return rows


def _trained(fold_folder: Path) -> bool:
    return (fold_folder / "checkpoint_final.pth").is_file() and (fold_folder / "validation" / "summary.json").is_file()


def run_ablation(dataset: str | int, configuration: str, fold: int, schedule: str = "full", sweep: bool = False,
                 plans: str = "nnUNetPlans", device: str | None = None, variants: Sequence[str] | None = None) -> Path:
    """Train what is missing, compare, write table2.md; returns the comparison folder."""
    if schedule not in SCHEDULES:
        raise NnunetRLError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    results, _ = require_nnunet_folders("nnUNet_results", "nnUNet_preprocessed")
    name = nnunet_dataset_name(dataset)
    rows = ablation_trainers(schedule, sweep, variants)
    for trainer in rows.values():
        fold_folder = results / name / f"{trainer}__{plans}__{configuration}" / f"fold_{fold}"
        if _trained(fold_folder):
            print(f"reusing {fold_folder}", flush=True)
            continue
        command = [nnunet_command("nnUNetv2_train"), name, configuration, str(fold), "-tr", trainer, "-p", plans]
        if device is not None:
            command += ["-device", device]
        if (fold_folder / "checkpoint_latest.pth").is_file():
            command.append("--c")
        run(command)
    output = results / name / f"ablation__{plans}__{configuration}__fold_{fold}"
    compare_trainers(name, configuration, list(rows.values()), [fold], output, plans)
    (output / "table2.md").write_text(table2(load_json(str(output / "summary.json")), rows))
    print(f"ablation table: {output / 'table2.md'}", flush=True)
    return output


def _mean_over_classes(statistics: dict, metric: str) -> float | None:
    means = [per_class[metric]["mean"] for per_class in statistics.values() if per_class[metric]["mean"] is not None]
    return sum(means) / len(means) if means else None


def table2(summary: dict, rows: dict[str, str]) -> str:
    """The paper's Table 2 layout with our numbers: per variant, Dice and HD95 averaged over the classes."""
    lines = [f"# Ablation ({len(summary['cases'])} validation cases; per-class means averaged over "
             f"{len(summary['classes'])} classes)", "",
             "| method | trainer | Dice | HD95 (mm) |", "|---|---|---:|---:|"]
    for label, trainer in rows.items():
        statistics = summary["statistics"][trainer]
        dice, hd95 = _mean_over_classes(statistics, "Dice"), _mean_over_classes(statistics, "HD95")
        lines.append(f"| {label} | {trainer} | {'' if dice is None else f'{dice:.3f}'} | "
                     f"{'' if hd95 is None else f'{hd95:.2f}'} |")
    lines += ["", f"Per class, Wilcoxon tests against {rows['nnU-Net (stock)']}: report.md in this folder."]
    return "\n".join(lines) + "\n"
