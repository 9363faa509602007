import json

import numpy as np
import pytest
import SimpleITK as sitk
from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

from nnunet_rl.cli import main
from nnunet_rl.datasets.common import HEART_LABELS
from nnunet_rl.datasets.mmwhs import convert_mmwhs
from nnunet_rl.errors import NnunetRLError

SHAPE = (6, 8, 10)  # array order z, y, x
SPACING = (0.7, 0.8, 1.25)  # SimpleITK order x, y, z
ORIGIN = (-10.0, 5.0, 3.5)
DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
MMWHS_VALUES = (0, 500, 600, 420, 550, 205, 820, 850)
NNUNET_LABEL = {**dict(zip(MMWHS_VALUES, range(8))), 421: 3}

pytestmark = pytest.mark.filterwarnings("ignore:.*stray label value 421")  # asserted where it matters


def _write(array, path):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def _read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _label(seed, extra_value=None):
    """Random MM-WHS values (all eight occur), plus extra_value in one corner voxel."""
    label = np.array(MMWHS_VALUES, dtype=np.int16)[np.random.default_rng(seed).integers(0, 8, SHAPE)]
    if extra_value is not None:
        label[0, 0, 0] = extra_value
    return label


@pytest.fixture
def source(tmp_path):
    """A tiny MM-WHS tree: two CT training cases (one in a subfolder, one flat; 1001 has the stray 421), one test."""
    root = tmp_path / "MM-WHS"
    rng = np.random.default_rng(0)
    _write(rng.integers(-1000, 1000, SHAPE).astype(np.int16), root / "ct_train" / "ct_train_1001_image.nii.gz")
    _write(_label(1, extra_value=421), root / "ct_train" / "ct_train_1001_label.nii.gz")
    _write(rng.integers(-1000, 1000, SHAPE).astype(np.int16), root / "ct_train_1002_image.nii.gz")
    _write(_label(2), root / "ct_train_1002_label.nii.gz")
    _write(rng.integers(-1000, 1000, SHAPE).astype(np.int16), root / "ct_test" / "ct_test_2001_image.nii.gz")
    return root


@pytest.fixture
def raw(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "nnUNet_raw"))
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    monkeypatch.delenv("nnUNet_results", raising=False)
    return tmp_path / "nnUNet_raw"


def test_converts_labels_files_and_geometry(source, raw):
    with pytest.warns(UserWarning, match=r"ct_train_1001_label\.nii\.gz: stray label value 421 converted to 3"):
        folder = convert_mmwhs(source, "ct", 20)
    assert folder == raw / "Dataset020_MMWHS_CT"
    assert sorted(p.name for p in raw.iterdir()) == [folder.name]
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == ["ct_1001_0000.nii.gz", "ct_1002_0000.nii.gz"]
    assert sorted(p.name for p in (folder / "imagesTs").iterdir()) == ["ct_2001_0000.nii.gz"]
    assert not (folder / "labelsTs").exists()

    info = json.loads((folder / "dataset.json").read_text())
    assert info["channel_names"] == {"0": "CT"} and info["labels"] == HEART_LABELS
    assert info["numTraining"] == 2 and info["file_ending"] == ".nii.gz"

    for number, label in (("1001", _label(1, extra_value=421)), ("1002", _label(2))):
        converted = _read(folder / "labelsTr" / f"ct_{number}.nii.gz")
        assert np.array_equal(converted, np.vectorize(NNUNET_LABEL.get)(label))
    for converted_path, original_path in (("labelsTr/ct_1001.nii.gz", "ct_train/ct_train_1001_label.nii.gz"),
                                          ("imagesTs/ct_2001_0000.nii.gz", "ct_test/ct_test_2001_image.nii.gz"),
                                          ("imagesTr/ct_1002_0000.nii.gz", "ct_train_1002_image.nii.gz")):
        converted, original = sitk.ReadImage(str(folder / converted_path)), sitk.ReadImage(str(source / original_path))
        assert converted.GetSpacing() == pytest.approx(SPACING)
        assert converted.GetOrigin() == pytest.approx(ORIGIN)
        assert converted.GetDirection() == pytest.approx(DIRECTION)
        if converted_path.startswith("images"):
            assert converted.GetPixelID() == original.GetPixelID()
            assert np.array_equal(sitk.GetArrayFromImage(converted), sitk.GetArrayFromImage(original))

    verify_dataset_integrity(str(folder), num_processes=1)


def _assert_refused(source, raw, *fragments, modality="ct"):
    with pytest.raises(NnunetRLError) as error:
        convert_mmwhs(source, modality, 20)
    for fragment in fragments:
        assert fragment in str(error.value)
    assert not raw.exists() or not any(raw.iterdir())


def test_unknown_label_value(source, raw):
    _write(_label(2, extra_value=999), source / "ct_train_1002_label.nii.gz")
    _assert_refused(source, raw, "ct_train_1002_label.nii.gz", "unknown label values [999]")


def test_missing_label_file(source, raw):
    (source / "ct_train_1002_label.nii.gz").unlink()
    _assert_refused(source, raw, "ct_train_1002_image.nii.gz", "without its label file ct_train_1002_label.nii.gz")


def test_every_problem_in_one_error(source, raw):
    (source / "ct_test" / "ct_test_2001_image.nii.gz").write_bytes(b"not a nifti")
    _write(_label(2, extra_value=999), source / "ct_train_1002_label.nii.gz")
    _assert_refused(source, raw, "ct_test_2001_image.nii.gz: unreadable", "ct_train_1002_label.nii.gz: unknown")


@pytest.mark.parametrize("modality, fragment", [("us", "unknown modality 'us'"), ("mr", "wrong --modality?")])
def test_wrong_modality(source, raw, modality, fragment):
    _assert_refused(source, raw, fragment, modality=modality)


def test_empty_or_missing_source(tmp_path, raw):
    (tmp_path / "empty").mkdir()
    _assert_refused(tmp_path / "empty", raw, "no ct_train_<number>_image.nii.gz files under")
    _assert_refused(tmp_path / "absent", raw, "is not a folder")


def test_cli_convert_mmwhs(source, raw, capsys):
    main(["convert-mmwhs", str(source), "--modality", "ct", "--id", "21"])
    assert f"wrote {raw / 'Dataset021_MMWHS_CT'}" in capsys.readouterr().out
