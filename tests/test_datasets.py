import json

import numpy as np
import pytest
import SimpleITK as sitk
from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

from nnunet_rl.cli import main
from nnunet_rl.datasets import synthetic
from nnunet_rl.datasets.common import HEART_LABELS, free_dataset_id
from nnunet_rl.datasets.synthetic import MRI_INTENSITIES, make_dataset
from nnunet_rl.errors import NnunetRLError
from nnunet_rl.rotations import cube_rotations, rotate_array

SMALL = {2: 32, 3: 16}


@pytest.fixture
def raw(tmp_path, monkeypatch):
    """An empty $nnUNet_raw; $nnUNet_preprocessed and $nnUNet_results point at empty folders too."""
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / variable).mkdir()
        monkeypatch.setenv(variable, str(tmp_path / variable))
    return tmp_path / "nnUNet_raw"


def _read(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _dataset_json(folder):
    return json.loads((folder / "dataset.json").read_text())


def _small(kind, dataset_id, dim, **kwargs):
    return make_dataset(kind, dataset_id, dim=dim, cases=5, size=SMALL[dim], **kwargs)


@pytest.mark.parametrize("kind, name, channels", [("multimodal", "SynthHeartMM", {"0": "CT", "1": "MRI"}),
                                                  ("imbalanced", "SynthLesion", {"0": "MRI"})])
@pytest.mark.parametrize("dim", [2, 3])
def test_layout_shapes_labels_and_dataset_json(raw, kind, name, channels, dim):
    folder = _small(kind, 5, dim)
    assert folder == raw / f"Dataset005_{name}"
    assert sorted(p.name for p in raw.iterdir()) == [folder.name]  # no temporary folder left

    info = _dataset_json(folder)
    assert info["channel_names"] == channels
    assert info["numTraining"] == 5 and info["file_ending"] == ".nii.gz"
    expected_labels = HEART_LABELS if kind == "multimodal" else {"background": 0, "organ": 1, "lesion": 2}
    assert info["labels"] == expected_labels

    shape = (SMALL[dim],) * 3 if dim == 3 else (1, SMALL[2], SMALL[2])
    spacing = (1.5, 1.0, 1.0) if dim == 3 else (999.0, 1.0, 1.0)
    for split, cases in (("Tr", range(5)), ("Ts", range(5, 7))):
        assert len(list((folder / f"labels{split}").iterdir())) == len(cases)
        assert len(list((folder / f"images{split}").iterdir())) == len(cases) * len(channels)
        for case in cases:
            label_image = sitk.ReadImage(str(folder / f"labels{split}" / f"case_{case:03d}.nii.gz"))
            assert label_image.GetSpacing() == spacing[::-1]
            label = sitk.GetArrayFromImage(label_image)
            assert label.shape == shape
            assert set(np.unique(label)) == set(expected_labels.values())
            for channel in channels:
                image = _read(folder / f"images{split}" / f"case_{case:03d}_{int(channel):04d}.nii.gz")
                assert image.shape == shape and image.dtype == np.float32


@pytest.mark.parametrize("dim", [2, 3])
def test_lesions_cover_a_small_fraction(raw, dim):
    folder = make_dataset("imbalanced", 6, dim=dim, cases=8, size=SMALL[dim])
    for path in (folder / "labelsTr").iterdir():
        label = _read(path)
        assert 0.001 <= (label == 2).mean() <= 0.02
        assert (label == 2).sum() < (label == 1).sum()


def test_defaults(raw):
    folder = make_dataset("imbalanced", 7, dim=2)
    assert _dataset_json(folder)["numTraining"] == 20
    assert len(list((folder / "labelsTs").iterdir())) == 5
    assert _read(folder / "labelsTr" / "case_000.nii.gz").shape == (1, 64, 64)


def test_reproducible_from_seed(raw):
    first, same, other = (_small("multimodal", i, 3, seed=s) for i, s in ((1, 0), (2, 0), (3, 1)))
    for relative in ("imagesTr/case_003_0001.nii.gz", "labelsTs/case_006.nii.gz"):
        assert np.array_equal(_read(first / relative), _read(same / relative))
        assert not np.array_equal(_read(first / relative), _read(other / relative))


def _correlation(a, b):
    return np.corrcoef(a.ravel(), b.ravel())[0, 1]


def _assert_rotation_undone_by_inverse(folder, case, entry, dim):
    """Of all cube rotations, the recorded inverse re-aligns the MRI best with the labels' MRI intensities."""
    split = "Tr" if (folder / "labelsTr" / f"{case}.nii.gz").exists() else "Ts"
    label = _read(folder / f"labels{split}" / f"{case}.nii.gz")
    mri = _read(folder / f"images{split}" / f"{case}_0001.nii.gz")
    expected = np.asarray(MRI_INTENSITIES, dtype=float)[label]
    group = cube_rotations(dim)
    assert np.array_equal(group[entry["index"]], entry["matrix"])
    assert np.array_equal(group[entry["inverse_index"]], entry["inverse_matrix"])
    assert np.array_equal(np.asarray(entry["matrix"]) @ entry["inverse_matrix"], np.eye(dim))
    correlations = [_correlation(rotate_array(mri, m), expected) for m in group]
    assert int(np.argmax(correlations)) == entry["inverse_index"]
    assert correlations[entry["inverse_index"]] > 0.75


@pytest.mark.parametrize("dim", [2, 3])
def test_fixed_aux_rotation_is_recorded_and_undone_by_its_inverse(raw, dim):
    folder = _small("multimodal", 8, dim, rotate_aux="fixed", seed=3)
    record = _dataset_json(folder)["nnunet_rl"]["aux_rotation"]
    assert record["mode"] == "fixed" and record["channel"] == "1" and record["index"] != 0
    if dim == 3:
        assert sitk.ReadImage(str(folder / "labelsTr" / "case_000.nii.gz")).GetSpacing() == (1.0, 1.0, 1.0)
    for case in ("case_000", "case_004", "case_006"):
        _assert_rotation_undone_by_inverse(folder, case, record, dim)


def test_random_aux_rotation_is_recorded_per_case(raw):
    folder = _small("multimodal", 9, 3, rotate_aux="random", seed=1)
    record = _dataset_json(folder)["nnunet_rl"]["aux_rotation"]
    assert record["mode"] == "random"
    assert sorted(record["cases"]) == [f"case_{i:03d}" for i in range(7)]
    assert len({entry["index"] for entry in record["cases"].values()}) > 1
    for case, entry in record["cases"].items():
        _assert_rotation_undone_by_inverse(folder, case, entry, 3)


def test_refuses_a_used_id_and_finds_a_free_one(raw, tmp_path):
    existing = _small("imbalanced", 5, 2)
    (tmp_path / "nnUNet_preprocessed" / "Dataset006_Other").mkdir()
    for dataset_id, folder in ((5, existing), (6, tmp_path / "nnUNet_preprocessed" / "Dataset006_Other")):
        with pytest.raises(NnunetRLError, match=str(folder)):
            _small("multimodal", dataset_id, 2)
    assert free_dataset_id(5) == 7
    assert free_dataset_id(1) == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="organs"), "unknown kind 'organs'"),
    (dict(dim=4), "dim must be 2 or 3"),
    (dict(size=8), "size must be at least 16"),
    (dict(cases=2), "cases must be at least 5"),
    (dict(rotate_aux="sideways"), "unknown rotate_aux 'sideways'"),
    (dict(kind="imbalanced", rotate_aux="fixed"), "kind 'imbalanced' has one channel"),
    (dict(dataset_id=1000), "outside 1..999"),
])
def test_bad_arguments(raw, kwargs, message):
    arguments = dict(kind="multimodal", dataset_id=5, dim=3, cases=5, size=16) | kwargs
    with pytest.raises(NnunetRLError, match=message):
        make_dataset(**arguments)
    assert not any(raw.iterdir())


def test_needs_nnunet_raw(monkeypatch):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(NnunetRLError, match="nnUNet_raw not set"):
        _small("imbalanced", 5, 2)


def test_failure_leaves_nothing_behind(raw, monkeypatch):
    def broken_writer(*args):
        raise OSError("disk full")
    monkeypatch.setattr(synthetic, "write_image", broken_writer)
    with pytest.raises(OSError, match="disk full"):
        _small("multimodal", 5, 2)
    assert not any(raw.iterdir())


def test_nnunet_accepts_the_datasets(raw):
    for folder in (_small("multimodal", 10, 3, rotate_aux="fixed"), _small("imbalanced", 11, 2)):
        verify_dataset_integrity(str(folder), num_processes=1)


def test_cli_make_dataset(raw, capsys):
    arguments = ["make-dataset", "--kind", "multimodal", "--id", "5", "--dim", "2", "--cases", "5", "--size", "32",
                 "--rotate-aux", "random", "--seed", "4"]
    main(arguments)
    assert f"wrote {raw / 'Dataset005_SynthHeartMM'}" in capsys.readouterr().out
    assert _dataset_json(raw / "Dataset005_SynthHeartMM")["nnunet_rl"]["synthetic"]["seed"] == 4
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2
    assert "already used by" in capsys.readouterr().err


def _stack(dataset_id, **kwargs):
    return make_dataset("stacked", dataset_id, cases=5, size=32, **kwargs)


def _labels_per_slice(label):
    return [set(np.unique(s).tolist()) for s in label]


def test_stacked_cases_are_thick_slice_stacks_that_nnunet_accepts(raw):
    folder = _stack(12)
    assert folder == raw / "Dataset012_SynthCineStack"
    info = _dataset_json(folder)
    assert info["channel_names"] == {"0": "cineMRI"}
    assert info["labels"] == {"background": 0, "LV": 1, "myocardium": 2, "RV": 3}
    slice_counts = set()
    for split, cases in (("Tr", range(5)), ("Ts", range(5, 7))):
        for case in cases:
            label_image = sitk.ReadImage(str(folder / f"labels{split}" / f"case_{case:03d}.nii.gz"))
            assert label_image.GetSpacing() == (1.5, 1.5, 10.0)  # SimpleITK's x, y, z: 10 mm between slices
            label = sitk.GetArrayFromImage(label_image)
            image = _read(folder / f"images{split}" / f"case_{case:03d}_0000.nii.gz")
            assert 8 <= label.shape[0] <= 12 and label.shape[1:] == (32, 32) and image.shape == label.shape
            assert image.dtype == np.float32 and set(np.unique(label)) == {0, 1, 2, 3}
            slice_counts.add(label.shape[0])
    assert len(slice_counts) > 1
    verify_dataset_integrity(str(folder), num_processes=1)


def test_stacked_classes_are_absent_towards_apex_and_base(raw):
    folder = make_dataset("stacked", 13, cases=8, size=32, seed=2)
    empty_end_slices = 0
    for path in sorted((folder / "labelsTr").iterdir()):
        present = _labels_per_slice(_read(path))
        heart = [i for i, labels in enumerate(present) if labels != {0}]
        assert heart == list(range(heart[0], heart[-1] + 1))  # one contiguous heart
        assert present[heart[-1]] == {0, 2}  # the apex: myocardium only, no blood pool, no RV
        assert {1, 3} <= present[heart[0]]  # the base: all classes
        rv_slices = [i for i in heart if 3 in present[i]]
        lv_slices = [i for i in heart if 1 in present[i]]
        assert rv_slices[-1] <= lv_slices[-1] < heart[-1]  # the RV ends no later than the blood pool
        empty_end_slices += (heart[0] > 0) + (heart[-1] < len(present) - 1)
    assert empty_end_slices > 0


def test_stacked_intensities_separate_blood_from_myocardium_only_on_average(raw):
    folder = _stack(14)
    label, image = _read(folder / "labelsTr" / "case_000.nii.gz"), _read(folder / "imagesTr" / "case_000_0000.nii.gz")
    blood, myocardium = image[label == 1], image[label == 2]
    assert blood.mean() - myocardium.mean() > 150
    assert blood.min() < myocardium.max()  # noise makes single voxels ambiguous


def test_stacked_is_reproducible_from_seed(raw):
    first, same, other = (_stack(dataset_id, seed=seed) for dataset_id, seed in ((15, 0), (16, 0), (17, 1)))
    for relative in ("imagesTr/case_002_0000.nii.gz", "labelsTs/case_006.nii.gz"):
        assert np.array_equal(_read(first / relative), _read(same / relative))
        assert not np.array_equal(_read(first / relative), _read(other / relative))


@pytest.mark.parametrize("kwargs, message", [
    (dict(dim=2), "kind 'stacked' is a stack of 2D slices, a 3D image: use --dim 3, not 2"),
    (dict(size=16), "size must be at least 32"),
])
def test_stacked_bad_arguments(raw, kwargs, message):
    with pytest.raises(NnunetRLError, match=message):
        make_dataset(**(dict(kind="stacked", dataset_id=5, cases=5) | kwargs))
    assert not any(raw.iterdir())


def test_cli_make_dataset_stacked(raw, capsys):
    main(["make-dataset", "--kind", "stacked", "--id", "18", "--cases", "5", "--size", "32", "--seed", "3"])
    assert f"wrote {raw / 'Dataset018_SynthCineStack'}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["make-dataset", "--kind", "stacked", "--id", "19", "--dim", "2"])
    assert exit_info.value.code == 2
    assert "use --dim 3" in capsys.readouterr().err
