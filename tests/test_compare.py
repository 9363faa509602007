"""The trainer comparison on a fake nnU-Net results / preprocessed tree of tiny NIfTI files."""
import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_rl.cli import main
from nnunet_rl.compare import compare_prediction_folders, compare_trainers
from nnunet_rl.errors import NnunetRLError
from nnunet_rl.metrics import METRICS

DATASET = "Dataset042_Toy"
DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1, "lesion": 2},
                "numTraining": 6, "file_ending": ".nii.gz"}
FOLDS = {0: ["case_000", "case_001", "case_002"], 1: ["case_003", "case_004", "case_005"]}
STOCK, OURS = "nnUNetTrainer", "nnUNetTrainerPAM"
# SimpleITK spacing is (x, y, z); nnU-Net's array-axis order is (z, y, x)
SPACING_XYZ = {"case_001": (0.5, 1.0, 2.0)}
ISOTROPIC_XYZ = (1.5, 1.5, 1.5)


def reference_segmentation():
    """Organ: 10^3 cube; lesion: 2^3 block in a corner."""
    segmentation = np.zeros((16, 16, 16), dtype=np.uint8)
    segmentation[3:13, 3:13, 3:13] = 1
    segmentation[0:2, 0:2, 14:16] = 2
    return segmentation


def stock_segmentation(case):
    """Organ: the 8^3 cube one voxel inside the reference's; lesion: 5 voxels further along array axis 0 (z),
    missing in case_005."""
    segmentation = np.zeros((16, 16, 16), dtype=np.uint8)
    segmentation[4:12, 4:12, 4:12] = 1
    if case != "case_005":
        segmentation[5:7, 0:2, 14:16] = 2
    return segmentation


def write_nifti(segmentation, file, spacing_xyz):
    file.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(segmentation)
    image.SetSpacing(spacing_xyz)
    sitk.WriteImage(image, str(file))


def trainer_folder(root, trainer):
    return root / "results" / DATASET / f"{trainer}__nnUNetPlans__3d_fullres"


@pytest.fixture
def nnunet_tree(tmp_path, monkeypatch):
    """$nnUNet_preprocessed with dataset.json and gt_segmentations; $nnUNet_results with two trainers' validation
    predictions over two folds: the stock trainer as above, ours equal to the reference."""
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    preprocessed = tmp_path / "preprocessed" / DATASET
    preprocessed.mkdir(parents=True)
    (preprocessed / "dataset.json").write_text(json.dumps(DATASET_JSON))
    for fold, cases in FOLDS.items():
        for case in cases:
            spacing = SPACING_XYZ.get(case, ISOTROPIC_XYZ)
            write_nifti(reference_segmentation(), preprocessed / "gt_segmentations" / f"{case}.nii.gz", spacing)
            for trainer, segmentation in ((STOCK, stock_segmentation(case)), (OURS, reference_segmentation())):
                fold_folder = trainer_folder(tmp_path, trainer) / f"fold_{fold}"
                write_nifti(segmentation, fold_folder / "validation" / f"{case}.nii.gz", spacing)
                (fold_folder / "checkpoint_final.pth").touch()
    return tmp_path


def read_metrics_csv(output_dir):
    with (output_dir / "metrics.csv").open() as handle:
        return {(row["trainer"], row["case"], int(row["label"])): row for row in csv.DictReader(handle)}


def test_compare_trainers_writes_every_output_into_the_default_folder(nnunet_tree):
    output_dir = compare_trainers(DATASET, "3d_fullres", [STOCK, OURS], [0, 1])
    assert output_dir == nnunet_tree / "results" / DATASET / "comparison__nnUNetPlans__3d_fullres"
    expected = {"metrics.csv", "summary.json", "report.md", *(f"boxplot_{metric}.png" for metric in METRICS)}
    assert {file.name for file in output_dir.iterdir()} == expected
    assert all((output_dir / f"boxplot_{metric}.png").read_bytes().startswith(b"\x89PNG") for metric in METRICS)


def test_metrics_csv_holds_the_hand_computed_values(nnunet_tree):
    rows = read_metrics_csv(compare_trainers(42, "3d_fullres", [STOCK, OURS], [0, 1], nnunet_tree / "out"))
    assert len(rows) == 2 * 6 * 2
    assert rows[STOCK, "case_000", 1]["class"] == "organ"
    # nested cubes at 1.5 mm (see test_metrics.test_nested_cubes_surface_distances)
    organ = {metric: float(value) for metric, value in rows[STOCK, "case_000", 1].items() if metric in METRICS}
    assert organ == pytest.approx({"Dice": 2 * 512 / 1512, "IoU": 512 / 1000, "HD95": 1.5 * math.sqrt(2),
                                   "ASD": 1.5 * (680 + 96 * math.sqrt(2) + 8 * math.sqrt(3)) / 784,
                                   "BoundaryIoU": 296 / 936})
    # lesion 5 voxels off along z: half the surface distances are 4 voxels, half 5; z spacing 1.5 mm, in case_001 2 mm
    assert float(rows[STOCK, "case_000", 2]["HD95"]) == pytest.approx(7.5)
    assert float(rows[STOCK, "case_000", 2]["ASD"]) == pytest.approx(6.75)
    assert float(rows[STOCK, "case_001", 2]["HD95"]) == pytest.approx(10.0)
    assert float(rows[STOCK, "case_001", 2]["ASD"]) == pytest.approx(9.0)
    assert float(rows[STOCK, "case_001", 2]["Dice"]) == 0.0
    assert math.isnan(float(rows[STOCK, "case_005", 2]["HD95"]))
    assert [float(rows[OURS, "case_003", 1][metric]) for metric in METRICS] == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_summary_json_holds_statistics_and_p_values(nnunet_tree):
    output_dir = compare_trainers(DATASET, "3d_fullres", [STOCK, OURS], [0, 1], nnunet_tree / "out")
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["reference_trainer"] == STOCK
    assert summary["cases"] == [case for cases in FOLDS.values() for case in cases]
    assert summary["statistics"][STOCK]["1"]["Dice"] == pytest.approx({"mean": 1024 / 1512, "sd": 0.0, "n": 6,
                                                                       "n_nan": 0})
    dice_test = summary["wilcoxon"][OURS]["1"]["Dice"]
    assert dice_test["n_pairs"] == 6 and dice_test["not_tested"] is None
    assert dice_test["median_difference"] == pytest.approx(1 - 1024 / 1512)
    assert 0 < dice_test["p_value"] < 0.05
    # case_005: the stock trainer missed the lesion, its HD95 is NaN and leaves the pair
    assert summary["statistics"][STOCK]["2"]["HD95"]["n_nan"] == 1
    hd95_test = summary["wilcoxon"][OURS]["2"]["HD95"]
    assert (hd95_test["n_pairs"], hd95_test["n_nan_excluded"]) == (5, 1)
    assert 0 < hd95_test["p_value"] <= 1
    report = (output_dir / "report.md").read_text()
    assert f"Paired Wilcoxon signed-rank tests against {STOCK}" in report
    assert "(n=5, 1 NaN)" in report


def test_identical_predictions_are_reported_as_not_tested(nnunet_tree, tmp_path):
    folder = trainer_folder(nnunet_tree, STOCK) / "fold_0" / "validation"
    output_dir = compare_prediction_folders({"a": folder, "b": folder},
                                            nnunet_tree / "preprocessed" / DATASET / "gt_segmentations",
                                            DATASET_JSON, tmp_path / "same")
    test = json.loads((output_dir / "summary.json").read_text())["wilcoxon"]["b"]["1"]["Dice"]
    assert test["not_tested"] == "all paired differences are zero" and test["p_value"] is None
    assert "not tested: all paired differences are zero" in (output_dir / "report.md").read_text()


def test_2d_images_are_compared_in_2d(tmp_path):
    # nested squares at 0.5 mm (see test_metrics.test_nested_squares_2d)
    reference, prediction = np.zeros((14, 14), dtype=np.uint8), np.zeros((14, 14), dtype=np.uint8)
    reference[2:12, 2:12] = 1
    prediction[3:11, 3:11] = 1
    write_nifti(reference, tmp_path / "gt" / "slice.nii.gz", (0.5, 0.5))
    write_nifti(prediction, tmp_path / "a" / "slice.nii.gz", (0.5, 0.5))
    dataset_json = {"labels": {"background": 0, "organ": 1}, "file_ending": ".nii.gz"}
    compare_prediction_folders({"a": tmp_path / "a"}, tmp_path / "gt", dataset_json, tmp_path / "out")
    row = read_metrics_csv(tmp_path / "out")["a", "slice", 1]
    assert float(row["HD95"]) == pytest.approx(0.5 * (1 + 0.85 * (math.sqrt(2) - 1)))
    assert "Only one trainer: nothing to test." in (tmp_path / "out" / "report.md").read_text()


def test_missing_trainers_folds_and_validations_are_listed_in_one_error(nnunet_tree):
    validation = trainer_folder(nnunet_tree, OURS) / "fold_1" / "validation"
    for file in validation.iterdir():
        file.unlink()
    validation.rmdir()
    unfinished = trainer_folder(nnunet_tree, STOCK) / "fold_0"
    for file in (unfinished / "validation").iterdir():
        file.unlink()
    (unfinished / "checkpoint_final.pth").unlink()
    with pytest.raises(NnunetRLError) as error:
        compare_trainers(DATASET, "3d_fullres", [STOCK, OURS, "nnUNetTrainerMissing"], [0, 1, 2])
    message = str(error.value)
    train = f"nnUNetv2_train {DATASET} 3d_fullres {{fold}} -tr {{trainer}} -p nnUNetPlans"
    expected = [train.format(fold=2, trainer=STOCK), train.format(fold=2, trainer=OURS),
                train.format(fold=1, trainer=OURS) + " --val", train.format(fold=0, trainer=STOCK) + " --c",
                *(train.format(fold=fold, trainer="nnUNetTrainerMissing") for fold in (0, 1, 2))]
    assert message.startswith(f"{len(expected)} trainer folds lack validation predictions")
    assert all(command + "\n" in message + "\n" for command in expected)
    assert str(validation) in message


def test_unpaired_cases_are_an_error_naming_them(nnunet_tree):
    (trainer_folder(nnunet_tree, OURS) / "fold_0" / "validation" / "case_001.nii.gz").unlink()
    with pytest.raises(NnunetRLError, match=f"{OURS} lacks case_001"):
        compare_trainers(DATASET, "3d_fullres", [STOCK, OURS], [0, 1])


def test_unset_nnunet_folders_are_an_error(monkeypatch):
    monkeypatch.delenv("nnUNet_results", raising=False)
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    with pytest.raises(NnunetRLError, match="nnUNet_results and nnUNet_preprocessed not set"):
        compare_trainers(DATASET, "3d_fullres", [STOCK, OURS], [0])


def test_region_based_labels_are_rejected(nnunet_tree):
    dataset_json = {"labels": {"background": 0, "whole": [1, 2], "core": 2}, "file_ending": ".nii.gz"}
    folder = trainer_folder(nnunet_tree, STOCK) / "fold_0" / "validation"
    with pytest.raises(NnunetRLError, match="region-based labels are not supported.*whole"):
        compare_prediction_folders({"a": folder}, folder, dataset_json, nnunet_tree / "out")


def test_cli_compare_prints_the_report(nnunet_tree, capsys):
    output_dir = nnunet_tree / "cli"
    main(["compare", "42", "-c", "3d_fullres", "-tr", STOCK, OURS, "-f", "0", "1", "-o", str(output_dir)])
    printed = capsys.readouterr().out
    assert printed.startswith("# Trainer comparison")
    assert f"report written to {output_dir}" in printed
    assert (output_dir / "summary.json").is_file()


def test_cli_compare_reports_missing_folds_without_a_traceback(nnunet_tree, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["compare", DATASET, "-c", "3d_fullres", "-tr", STOCK, "-f", "0", "3"])
    assert exit_.value.code == 2
    assert f"nnUNetv2_train {DATASET} 3d_fullres 3 -tr {STOCK} -p nnUNetPlans" in capsys.readouterr().err


def test_each_trainer_can_name_its_own_plans(nnunet_tree, capsys):
    """Stock nnU-Net on the dataset's own nnUNetPlans beside models of other plans (-p), e.g. an unpaired MRI dataset:
    ``TRAINER@PLANS`` reads ``TRAINER__PLANS__CONFIG``, is reported under that name and missing folds name its plans."""
    moved = nnunet_tree / "results" / DATASET / f"{OURS}__nnUNetPlans_from041__3d_fullres"
    trainer_folder(nnunet_tree, OURS).rename(moved)
    output_dir = nnunet_tree / "own_plans"
    main(["compare", DATASET, "-c", "3d_fullres", "-p", "nnUNetPlans_from041", "-tr", f"{STOCK}@nnUNetPlans", OURS,
          "-f", "0", "1", "-o", str(output_dir)])
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["trainers"] == [f"{STOCK}@nnUNetPlans", OURS]
    rows = read_metrics_csv(output_dir)
    assert float(rows[OURS, "case_000", 1]["Dice"]) == 1.0
    assert float(rows[f"{STOCK}@nnUNetPlans", "case_000", 1]["Dice"]) < 1.0
    with pytest.raises(SystemExit):
        main(["compare", DATASET, "-c", "3d_fullres", "-p", "nnUNetPlans_from041", "-tr", STOCK, OURS, "-f", "0"])
    assert f"-tr {STOCK} -p nnUNetPlans_from041" in capsys.readouterr().err
    with pytest.raises(NnunetRLError, match="is not TRAINER, TRAINER@PLANS or TRAINER__PLANS__CONFIGURATION"):
        compare_trainers(DATASET, "3d_fullres", [STOCK, "@nnUNetPlans"], [0])


def test_a_trainer_can_be_named_by_its_results_folder(nnunet_tree):
    """``TRAINER__PLANS__CONFIGURATION`` (nnU-Net's results folder) compares a model of another configuration, e.g. a
    refinement stage beside its first stage, on the same folds' validation cases."""
    refine = f"{OURS}__nnUNetPlans__3d_fullres_refine"
    trainer_folder(nnunet_tree, OURS).rename(nnunet_tree / "results" / DATASET / refine)
    output_dir = nnunet_tree / "refine"
    main(["compare", DATASET, "-c", "3d_fullres", "-tr", STOCK, refine, "-f", "0", "1", "-o", str(output_dir)])
    assert json.loads((output_dir / "summary.json").read_text())["trainers"] == [STOCK, refine]
    assert float(read_metrics_csv(output_dir)[refine, "case_000", 1]["Dice"]) == 1.0
