"""Compare trainers' nnU-Net predictions against the first trainer (stock nnU-Net), case by case and class by class.

Per case and class: Dice, IoU, HD95, ASD and boundary IoU (``nnunet_rl.metrics``); per trainer, class and metric:
mean, sd and n; per trainer (against the first), class and metric: a paired two-sided Wilcoxon signed-rank test.
Written into the output folder: metrics.csv, summary.json, report.md and boxplot_<metric>.png (docs/compare.md).
"""
import csv
import json
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from nnunetv2.imageio.base_reader_writer import BaseReaderWriter
from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
from scipy.stats import wilcoxon
from tqdm import tqdm

from nnunet_rl.errors import NnunetRLError
from nnunet_rl.metrics import DEFAULT_BOUNDARY_DISTANCE_MM, METRICS, case_metrics
from nnunet_rl.nnunet_folders import dataset_name as nnunet_dataset_name
from nnunet_rl.nnunet_folders import require_nnunet_folders

HIGHER_IS_BETTER = {"Dice": True, "IoU": True, "HD95": False, "ASD": False, "BoundaryIoU": True}
METRIC_LABELS = {"Dice": "Dice", "IoU": "IoU", "HD95": "HD95 (mm)", "ASD": "ASD (mm)",
                 "BoundaryIoU": f"boundary IoU (d = {DEFAULT_BOUNDARY_DISTANCE_MM:g} mm)"}
MIN_PAIRS = 2

# trainer -> case -> label -> metric -> value
MetricTable = dict[str, dict[str, dict[int, dict[str, float]]]]


class ModelFolder(NamedTuple):
    """One compared model: its results folder ``<trainer>__<plans>__<configuration>``."""
    trainer: str
    plans: str
    configuration: str

    @property
    def name(self) -> str:
        return f"{self.trainer}__{self.plans}__{self.configuration}"


def model_folder(trainer: str, default_plans: str, default_configuration: str) -> ModelFolder:
    """``TRAINER`` (with ``default_plans`` and ``default_configuration``), ``TRAINER@PLANS``, or a results folder's
    name ``TRAINER__PLANS__CONFIGURATION``, as ``nnunet-rl compare -tr`` takes them: e.g. stock nnU-Net on a dataset's
    own ``nnUNetPlans`` beside models trained with other plans, or a refinement stage (``..._refine``) beside its
    first stage. Folds of every configuration split the same cases (nnU-Net's ``splits_final.json``)."""
    parts = trainer.split("__")
    if len(parts) == 3 and all(parts):
        return ModelFolder(*parts)
    name, _, plans = trainer.partition("@")
    if len(parts) != 1 or not name or "@" in plans:
        raise NnunetRLError(f"{trainer!r} is not TRAINER, TRAINER@PLANS or TRAINER__PLANS__CONFIGURATION")
    return ModelFolder(name, plans or default_plans, default_configuration)


def compare_trainers(dataset: Union[int, str], configuration: str, trainers: list[str], folds: list[int],
                     output_dir: Optional[Union[str, Path]] = None, plans: str = "nnUNetPlans") -> Path:
    """Compare the validation predictions of ``trainers`` over ``folds`` (cases pooled across folds) in nnU-Net's
    folder layout. Each trainer is ``TRAINER`` (plans ``plans``), ``TRAINER@PLANS`` or
    ``TRAINER__PLANS__CONFIGURATION`` (:func:`model_folder`) and is reported under that
    name; the first is the reference. Default ``output_dir``:
    ``$nnUNet_results/<DatasetName>/comparison__<plans>__<configuration>``."""
    results, preprocessed = require_nnunet_folders("nnUNet_results", "nnUNet_preprocessed")
    dataset_name = nnunet_dataset_name(dataset)
    _check_trainers(trainers)
    models = {trainer: model_folder(trainer, plans, configuration) for trainer in trainers}
    dataset_json = _load_dataset_json(preprocessed / dataset_name / "dataset.json")
    file_ending = dataset_json["file_ending"]
    fold_folders = {(trainer, fold): results / dataset_name / model.name / f"fold_{fold}"
                    for trainer, model in models.items() for fold in folds}
    _require_validation(fold_folders, models, dataset_name, file_ending)
    prediction_files = {trainer: _pooled_cases([fold_folders[trainer, fold] / "validation" for fold in folds],
                                               file_ending) for trainer in trainers}
    if output_dir is None:
        output_dir = results / dataset_name / f"comparison__{plans}__{configuration}"
    return _compare(prediction_files, preprocessed / dataset_name / "gt_segmentations", dataset_json,
                    Path(output_dir))


def compare_prediction_folders(predictions: dict[str, Path], reference_folder: Path, dataset_json: dict,
                               output_dir: Path) -> Path:
    """Compare the ``<case><file_ending>`` files of each named prediction folder with ``reference_folder``; the first
    entry of ``predictions`` is the reference trainer. Writes the report files into ``output_dir`` and returns it."""
    _check_dataset_json(dataset_json)
    _check_trainers(list(predictions))
    prediction_files = {trainer: _cases_in(Path(folder), dataset_json["file_ending"])
                        for trainer, folder in predictions.items()}
    empty = [f"{trainer}: {predictions[trainer]}" for trainer, files in prediction_files.items() if not files]
    if empty:
        raise NnunetRLError(f"no *{dataset_json['file_ending']} predictions in these folders:\n  " + "\n  ".join(empty))
    return _compare(prediction_files, Path(reference_folder), dataset_json, Path(output_dir))


def _compare(prediction_files: dict[str, dict[str, Path]], reference_folder: Path, dataset_json: dict,
             output_dir: Path) -> Path:
    labels = _class_labels(dataset_json)
    reference_files = _reference_files(reference_folder, _paired_cases(prediction_files), dataset_json["file_ending"])
    reader = _reader(dataset_json, next(iter(reference_files.values())))
    table = _metric_table(prediction_files, reference_files, labels, reader, dataset_json["labels"].get("ignore"))
    summary = _summarise(table, labels)
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_metrics_csv(table, labels, output_dir / "metrics.csv")
    _write_summary_json(summary, output_dir / "summary.json")
    (output_dir / "report.md").write_text(_report_markdown(summary))
    for metric in METRICS:
        _plot_boxplot(table, labels, metric, output_dir / f"boxplot_{metric}.png")
    return output_dir


# ---------------------------------------------------------------- nnU-Net's folder layout

def _load_dataset_json(file: Path) -> dict:
    if not file.is_file():
        raise NnunetRLError(f"{file} not found; run nnUNetv2_plan_and_preprocess for this dataset first")
    dataset_json = json.loads(file.read_text())
    _check_dataset_json(dataset_json)
    return dataset_json


def _require_validation(fold_folders: dict[tuple[str, int], Path], models: dict[str, ModelFolder],
                        dataset_name: str, file_ending: str) -> None:
    """One error listing every (trainer, fold) without validation predictions and the nnU-Net command for each."""
    missing = []
    for (trainer, fold), folder in fold_folders.items():
        model = models[trainer]
        train = f"nnUNetv2_train {dataset_name} {model.configuration} {fold} -tr {model.trainer} -p {model.plans}"
        if not folder.is_dir():
            missing.append(f"{folder} does not exist; train it with: {train}")
        elif _cases_in(folder / "validation", file_ending):
            continue
        elif not (folder / "checkpoint_final.pth").is_file():
            missing.append(f"{folder} has no validation and no checkpoint_final.pth; finish training with: {train} --c")
        else:
            missing.append(f"{folder / 'validation'} has no *{file_ending} predictions; make them with: {train} --val")
    if missing:
        raise NnunetRLError(f"{len(missing)} trainer folds lack validation predictions:\n  " + "\n  ".join(missing))


# ---------------------------------------------------------------- cases, labels, files

def _check_trainers(trainers: Sequence[str]) -> None:
    if not trainers:
        raise NnunetRLError("no trainers to compare")
    repeated = sorted({trainer for trainer in trainers if trainers.count(trainer) > 1})
    if repeated:
        raise NnunetRLError(f"trainers named more than once: {', '.join(repeated)}")


def _check_dataset_json(dataset_json: dict) -> None:
    missing = [key for key in ("labels", "file_ending") if key not in dataset_json]
    if missing:
        raise NnunetRLError(f"dataset.json lacks {', '.join(missing)}")


def _class_labels(dataset_json: dict) -> dict[int, str]:
    """{label: class name} of the foreground classes (no background, no 'ignore'); regions are not supported."""
    classes = {name: value for name, value in dataset_json["labels"].items() if name != "ignore" and value != 0}
    regions = {name: value for name, value in classes.items() if not isinstance(value, int)}
    if regions:
        raise NnunetRLError(f"region-based labels are not supported by compare: {regions}")
    return {value: name for name, value in sorted(classes.items(), key=lambda item: item[1])}


def _cases_in(folder: Path, file_ending: str) -> dict[str, Path]:
    """{case: file} of every ``<case><file_ending>`` in ``folder``; empty if the folder does not exist."""
    if not folder.is_dir():
        return {}
    return {file.name[:-len(file_ending)]: file for file in sorted(folder.iterdir())
            if file.is_file() and file.name.endswith(file_ending)}


def _pooled_cases(folders: Sequence[Path], file_ending: str) -> dict[str, Path]:
    """{case: file} over several folders (one trainer's folds); a case in two of them is an error."""
    pooled = {}
    for folder in folders:
        for case, file in _cases_in(folder, file_ending).items():
            if case in pooled:
                raise NnunetRLError(f"case {case} is in both {pooled[case]} and {file}; the folds must not overlap")
            pooled[case] = file
    return pooled


def _paired_cases(prediction_files: dict[str, dict[str, Path]]) -> list[str]:
    """The cases all trainers share; an error naming what each trainer lacks if they differ."""
    all_cases = set().union(*prediction_files.values())
    lacking = {trainer: sorted(all_cases - files.keys()) for trainer, files in prediction_files.items()}
    differences = [f"{trainer} lacks {', '.join(cases)}" for trainer, cases in lacking.items() if cases]
    if differences:
        raise NnunetRLError("the trainers' predictions must cover the same cases (paired comparison):\n  "
                            + "\n  ".join(differences))
    return sorted(all_cases)


def _reference_files(reference_folder: Path, cases: list[str], file_ending: str) -> dict[str, Path]:
    files = {case: reference_folder / f"{case}{file_ending}" for case in cases}
    missing = [str(file) for file in files.values() if not file.is_file()]
    if missing:
        raise NnunetRLError(f"{len(missing)} reference segmentations not found:\n  " + "\n  ".join(missing))
    return files


# ---------------------------------------------------------------- reading and computing

def _reader(dataset_json: dict, example_file: Path) -> BaseReaderWriter:
    try:
        return determine_reader_writer_from_dataset_json(dataset_json, str(example_file), verbose=False)()
    except RuntimeError as error:
        raise NnunetRLError(f"nnU-Net has no reader for {example_file}: {error}") from error


def _read_segmentation(reader: BaseReaderWriter, file: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """Label map and spacing (mm, array-axis order) without nnU-Net's channel axis and without axes of size 1
    (nnU-Net reads a 2D image as 1 x H x W with a dummy spacing for the first axis)."""
    segmentation, properties = reader.read_seg(str(file))
    segmentation = segmentation[0]
    kept_axes = [axis for axis, size in enumerate(segmentation.shape) if size > 1]
    return segmentation.squeeze(), tuple(float(properties["spacing"][axis]) for axis in kept_axes)


def _read_prediction(reader: BaseReaderWriter, file: Path, reference_file: Path, reference: np.ndarray,
                     spacing: tuple[float, ...]) -> np.ndarray:
    """The prediction's label map, checked to lie on the reference's voxel grid."""
    prediction, prediction_spacing = _read_segmentation(reader, file)
    if prediction.shape != reference.shape or not np.allclose(prediction_spacing, spacing, rtol=1e-3):
        raise NnunetRLError(f"{file} (shape {prediction.shape}, spacing {prediction_spacing}) does not match "
                            f"{reference_file} (shape {reference.shape}, spacing {spacing})")
    return prediction


def _without_ignored(prediction: np.ndarray, reference: np.ndarray,
                     ignore_label: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
    """Both label maps with the reference's 'ignore' voxels set to background (Dice and IoU then equal nnU-Net's)."""
    if ignore_label is None:
        return prediction, reference
    ignored = reference == ignore_label
    return np.where(ignored, 0, prediction), np.where(ignored, 0, reference)


def _metric_table(prediction_files: dict[str, dict[str, Path]], reference_files: dict[str, Path],
                  labels: dict[int, str], reader: BaseReaderWriter, ignore_label: Optional[int]) -> MetricTable:
    table = {trainer: {} for trainer in prediction_files}
    for case, reference_file in tqdm(reference_files.items(), desc="metrics per case", unit="case"):
        reference, spacing = _read_segmentation(reader, reference_file)
        for trainer, files in prediction_files.items():
            prediction = _read_prediction(reader, files[case], reference_file, reference, spacing)
            table[trainer][case] = case_metrics(*_without_ignored(prediction, reference, ignore_label),
                                                list(labels), spacing)
    return table


def _values(table: MetricTable, trainer: str, label: int, metric: str) -> np.ndarray:
    """One metric of one class over all cases (sorted by case, hence paired between trainers)."""
    cases = table[trainer]
    return np.array([cases[case][label][metric] for case in sorted(cases)], dtype=float)


# ---------------------------------------------------------------- statistics

def _summarise(table: MetricTable, labels: dict[int, str]) -> dict:
    """Everything summary.json and report.md hold; classes are keyed by their label as a string, missing values
    (no mean of zero values, no test) are None."""
    trainers = list(table)
    first = trainers[0]
    return {
        "reference_trainer": first,
        "trainers": trainers,
        "cases": sorted(table[first]),
        "classes": {str(label): name for label, name in labels.items()},
        "boundary_distance_mm": DEFAULT_BOUNDARY_DISTANCE_MM,
        "statistics": {trainer: {str(label): {metric: _describe(_values(table, trainer, label, metric))
                                              for metric in METRICS} for label in labels} for trainer in trainers},
        "wilcoxon": {trainer: {str(label): {metric: _paired_wilcoxon(_values(table, trainer, label, metric),
                                                                     _values(table, first, label, metric))
                                            for metric in METRICS} for label in labels} for trainer in trainers[1:]},
    }


def _describe(values: np.ndarray) -> dict:
    """Mean, sample sd and n of the non-NaN values; n_nan counts the NaN ones."""
    valid = values[~np.isnan(values)]
    return {"mean": float(valid.mean()) if valid.size else None,
            "sd": float(valid.std(ddof=1)) if valid.size > 1 else None,
            "n": int(valid.size), "n_nan": int(values.size - valid.size)}


def _paired_wilcoxon(values: np.ndarray, first_values: np.ndarray) -> dict:
    """Two-sided Wilcoxon signed-rank test of ``values - first_values`` over the cases where neither is NaN."""
    paired = ~np.isnan(values) & ~np.isnan(first_values)
    differences = values[paired] - first_values[paired]
    result = {"n_pairs": int(paired.sum()), "n_nan_excluded": int(paired.size - paired.sum()),
              "median_difference": float(np.median(differences)) if differences.size else None,
              "statistic": None, "p_value": None, "not_tested": _untestable_reason(differences)}
    if result["not_tested"] is None:
        test = wilcoxon(differences)
        result.update(statistic=float(test.statistic), p_value=float(test.pvalue))
    return result


def _untestable_reason(differences: np.ndarray) -> Optional[str]:
    if differences.size < MIN_PAIRS:
        return f"too few pairs ({differences.size} < {MIN_PAIRS})"
    if not differences.any():
        return "all paired differences are zero"
    return None


# ---------------------------------------------------------------- writing

def _write_metrics_csv(table: MetricTable, labels: dict[int, str], file: Path) -> None:
    """One row per trainer, case and class; NaN is written as ``nan``."""
    with file.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["trainer", "case", "label", "class", *METRICS])
        for trainer, cases in table.items():
            for case in sorted(cases):
                for label, name in labels.items():
                    writer.writerow([trainer, case, label, name, *(cases[case][label][metric] for metric in METRICS)])


def _write_summary_json(summary: dict, file: Path) -> None:
    file.write_text(json.dumps(summary, indent=2, allow_nan=False))


def _report_markdown(summary: dict) -> str:
    return "\n".join(["# Trainer comparison", "", *_report_header(summary), *_statistics_section(summary),
                      *_wilcoxon_section(summary)])


def _report_header(summary: dict) -> list[str]:
    return [f"{len(summary['cases'])} paired cases; reference trainer **{summary['reference_trainer']}**. Dice, IoU "
            f"and boundary IoU: higher is better; HD95 and ASD (mm): lower is better. NaN values (HD95 or ASD where "
            f"exactly one of prediction and reference is empty) are left out and counted; definitions in nnunet_rl's "
            f"docs/metrics.md.", ""]


def _statistics_section(summary: dict) -> list[str]:
    lines = ["## Mean ± sd per trainer and class", ""]
    for metric in METRICS:
        lines += _statistics_table(summary, metric)
    return lines


def _wilcoxon_section(summary: dict) -> list[str]:
    first = summary["reference_trainer"]
    lines = [f"## Paired Wilcoxon signed-rank tests against {first}", ""]
    if not summary["wilcoxon"]:
        return lines + ["Only one trainer: nothing to test.", ""]
    lines += [f"Two-sided, over the per-case differences (trainer - {first}) of each class and metric; cases where "
              f"either value is NaN are left out of the pair (column 'NaN excluded'). W is the smaller of the "
              f"positive and negative rank sums. With fewer than 6 non-zero differences the exact test's p cannot "
              f"fall below 0.05; no correction for multiple comparisons.", ""]
    for metric in METRICS:
        lines += _wilcoxon_table(summary, metric)
    return lines


def _statistics_table(summary: dict, metric: str) -> list[str]:
    trainers = summary["trainers"]
    lines = [f"### {METRIC_LABELS[metric]}", "", "| class | " + " | ".join(trainers) + " |",
             "|---" * (len(trainers) + 1) + "|"]
    for label, name in summary["classes"].items():
        cells = [_mean_sd(summary["statistics"][trainer][label][metric]) for trainer in trainers]
        lines.append(f"| {label} ({name}) | " + " | ".join(cells) + " |")
    return lines + [""]


def _mean_sd(statistics: dict) -> str:
    nan_note = f", {statistics['n_nan']} NaN" if statistics["n_nan"] else ""
    return f"{_format(statistics['mean'])} ± {_format(statistics['sd'])} (n={statistics['n']}{nan_note})"


def _wilcoxon_table(summary: dict, metric: str) -> list[str]:
    lines = [f"### {METRIC_LABELS[metric]}", "",
             "| trainer | class | pairs | NaN excluded | median difference | W | p |", "|---" * 7 + "|"]
    for trainer, classes in summary["wilcoxon"].items():
        for label, name in summary["classes"].items():
            test = classes[label][metric]
            p_value = f"not tested: {test['not_tested']}" if test["not_tested"] else _format(test["p_value"], ".3g")
            lines.append(f"| {trainer} | {label} ({name}) | {test['n_pairs']} | {test['n_nan_excluded']} | "
                         f"{_format(test['median_difference'], '+.4g')} | {_format(test['statistic'])} | {p_value} |")
    return lines + [""]


def _format(value: Optional[float], spec: str = ".4g") -> str:
    return "n/a" if value is None else format(value, spec)


# ---------------------------------------------------------------- plotting

def _plot_boxplot(table: MetricTable, labels: dict[int, str], metric: str, file: Path) -> None:
    """One box per trainer and class, the trainers side by side within each class; NaN values are left out."""
    trainers = list(table)
    width = 0.8 / len(trainers)
    figure = Figure(figsize=(max(4.0, 1.5 * len(labels) * len(trainers) ** 0.5), 4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for index, trainer in enumerate(trainers):
        values = [_values(table, trainer, label, metric) for label in labels]
        positions = [position + (index - (len(trainers) - 1) / 2) * width for position in range(len(labels))]
        boxes = axes.boxplot([v[~np.isnan(v)] for v in values], positions=positions, widths=0.9 * width,
                             patch_artist=True, manage_ticks=False, medianprops={"color": "black"})
        for box in boxes["boxes"]:
            box.set_facecolor(f"C{index}")
    axes.set_xticks(range(len(labels)), [f"{label} ({name})" for label, name in labels.items()])
    axes.set_ylabel(METRIC_LABELS[metric])
    axes.set_title(f"{METRIC_LABELS[metric]} per case ({'higher' if HIGHER_IS_BETTER[metric] else 'lower'} is better)")
    axes.legend(handles=[Patch(facecolor=f"C{index}", label=trainer) for index, trainer in enumerate(trainers)])
    figure.savefig(file, dpi=100, bbox_inches="tight")
