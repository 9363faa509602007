"""Unpaired RL-U2Net (MM-WHS as distributed): synthetic MM-WHS-layout CT and MRI of different patients ->
convert-mmwhs -> plan-unpaired -> nnUNetv2_train -> nnUNetv2_predict (each modality) -> compare per modality; each
branch only ever sees its own dataset's cases; clear errors for bad set-ups."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from test_e2e import cli, user_environment
from test_rl_u2net import branch_kwargs

from nnunet_rl.datasets.mmwhs import LABEL_MAP
from nnunet_rl.datasets.synthetic import _heart_case
from nnunet_rl.errors import NnunetRLError
from nnunet_rl.plans.planner import nnUNetPlannerRLU2Net
from nnunet_rl.trainers import nnUNetTrainerRLU2Net_unpaired_3epochs_2iters as Unpaired
from nnunet_rl.unpaired import UnpairedDualBranchUNet

CT_ID, MR_ID = "971", "972"
CT, MR = "Dataset971_MMWHS_CT", "Dataset972_MMWHS_MR"
MR_PLANS = "nnUNetPlans_from971"
CONFIGURATION = "3d_fullres"
OURS, STOCK = Unpaired.__name__, "nnUNetTrainer_3epochs_2iters"
MMWHS_VALUE = np.array([value for value, _ in sorted(LABEL_MAP.items(), key=lambda item: item[1])], dtype=np.int16)


def write_mmwhs(root: Path, modality: str, numbers: list[int], test_number: int, seed: int) -> None:
    """MM-WHS 2017 files (``ct_train_1001_image.nii.gz`` ...) of 24³ heart phantoms; each modality its own patients."""
    channel = 0 if modality == "ct" else 1
    for index, number in enumerate([*numbers, test_number]):
        label, images = _heart_case(np.random.default_rng(seed + index), (24, 24, 24))
        split = "test" if number == test_number else "train"
        image = sitk.GetImageFromArray(images[channel] * (1000 if modality == "ct" else 300))
        sitk.WriteImage(image, str(root / f"{modality}_{split}" / f"{modality}_{split}_{number}_image.nii.gz"))
        if split == "train":
            sitk.WriteImage(sitk.GetImageFromArray(MMWHS_VALUE[label]),
                            str(root / f"{modality}_{split}" / f"{modality}_{split}_{number}_label.nii.gz"))


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> dict:
    """Both modalities converted from MM-WHS files and planned with ``nnunet-rl plan-unpaired``; the user's env."""
    base = tmp_path_factory.mktemp("unpaired")
    source = base / "MM-WHS"
    for folder in ("ct_train", "ct_test", "mr_train", "mr_test"):
        (source / folder).mkdir(parents=True)
    write_mmwhs(source, "ct", [1001, 1002, 1003, 1004, 1005], 2001, seed=0)
    write_mmwhs(source, "mr", [1001, 1002, 1003, 1004, 1005], 2001, seed=100)
    env = user_environment(base)
    cli("nnunet-rl", "convert-mmwhs", str(source), "--modality", "ct", "--id", CT_ID, env=env)
    cli("nnunet-rl", "convert-mmwhs", str(source), "--modality", "mr", "--id", MR_ID, env=env)
    cli("nnunet-rl", "plan-unpaired", CT_ID, MR_ID, "-c", CONFIGURATION, env=env)
    return env


@pytest.fixture
def nnunet_env(planned, monkeypatch) -> dict:
    """The planned folders in this process too (nnU-Net reads its folder variables at call time)."""
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(name, planned[name])
    return planned


def preprocessed(env: dict, dataset: str, plans: str = "nnUNetPlans") -> tuple[dict, dict]:
    folder = Path(env["nnUNet_preprocessed"]) / dataset
    return load_json(str(folder / f"{plans}.json")), load_json(str(folder / "dataset.json"))


def trainer(plans: dict, dataset_json: dict):
    plans = {**copy.deepcopy(plans), "continue_training": False}
    return Unpaired(plans, CONFIGURATION, 0, dataset_json, torch.device("cpu"))


def test_plans_share_the_topology_and_keep_each_modality_normalisation(nnunet_env):
    ct_plans, _ = preprocessed(nnunet_env, CT)
    mr_plans, mr_json = preprocessed(nnunet_env, MR, MR_PLANS)
    ct, mr = (plans["configurations"][CONFIGURATION] for plans in (ct_plans, mr_plans))
    assert mr["patch_size"] == ct["patch_size"] and mr["spacing"] == ct["spacing"]
    assert mr["architecture"] == ct["architecture"]
    assert ct["normalization_schemes"] == ["CTNormalization"] and mr["normalization_schemes"] == ["ZScoreNormalization"]
    assert mr["rl"]["rl_u2net"] == ct["rl"]["rl_u2net"]
    assert ct["rl"]["rl_u2net"]["unpaired"] == {
        "primary": {"dataset": CT, "plans": "nnUNetPlans", "channels": ["CT"]},
        "auxiliary": {"dataset": MR, "plans": MR_PLANS, "channels": ["MRI"]}}
    assert mr_json["channel_names"] == {"0": "MRI"}


def test_each_branch_sees_only_its_own_dataset_cases_and_resume_keeps_the_references(nnunet_env, tmp_path):
    unpaired = trainer(*preprocessed(nnunet_env, CT))
    unpaired.initialize()
    train, validation = unpaired.get_dataloaders()
    try:
        folds = {dataset: load_json(str(Path(nnunet_env["nnUNet_preprocessed"]) / dataset / "splits_final.json"))[0]
                 for dataset in (CT, MR)}
        seen = {"primary": set(), "auxiliary": set()}
        for _ in range(4):
            batch = next(train)
            assert batch["data"].shape[1] == 2  # CT patch, MRI patch
            for branch in seen:
                seen[branch] |= set(batch["keys"][branch])
                assert batch["target"][branch][0].shape[1] == 1
            assert not torch.equal(batch["target"]["primary"][0], batch["target"]["auxiliary"][0])
        assert seen["primary"] <= set(folds[CT]["train"]) and seen["auxiliary"] <= set(folds[MR]["train"])
        assert all(key.startswith("ct_") for key in seen["primary"])
        assert all(key.startswith("mr_") for key in seen["auxiliary"])
        assert set(next(validation)["keys"]) <= set(folds[CT]["val"])
        network = unpaired.bare_network
        assert network.has_references() and network.reference_primary.shape[1:] == network.reference_auxiliary.shape[1:]
    finally:
        train.finish()
        validation._finish()

    unpaired.save_checkpoint(str(tmp_path / "checkpoint.pth"))  # as --c finds it: loaded before the dataloaders start
    resumed = trainer(*preprocessed(nnunet_env, CT))
    resumed.load_checkpoint(str(tmp_path / "checkpoint.pth"))
    train, validation = resumed.get_dataloaders()
    train.finish()
    validation._finish()
    for branch in ("primary", "auxiliary"):
        assert torch.equal(resumed.bare_network.reference(branch), unpaired.bare_network.reference(branch))


def test_clear_errors_for_bad_set_ups(nnunet_env):
    plans, dataset_json = preprocessed(nnunet_env, CT)

    def refused(plans, dataset_json, *fragments):
        with pytest.raises(NnunetRLError) as error:
            trainer(plans, dataset_json).initialize()
        assert all(fragment in str(error.value) for fragment in fragments), str(error.value)

    not_unpaired = copy.deepcopy(plans)
    not_unpaired["configurations"][CONFIGURATION]["rl"]["rl_u2net"]["unpaired"] = None
    refused(not_unpaired, dataset_json, "nnunet-rl plan-unpaired")

    missing = copy.deepcopy(plans)
    missing["configurations"][CONFIGURATION]["rl"]["rl_u2net"]["unpaired"]["auxiliary"]["plans"] = "nnUNetPlans_x"
    refused(missing, dataset_json, "nnUNetPlans_x.json do not exist", f"nnunet-rl plan-unpaired {CT} {MR}")

    other_patch = copy.deepcopy(plans)
    other_patch["configurations"][CONFIGURATION]["patch_size"] = [16, 16, 16]
    refused(other_patch, dataset_json, "preprocessed with other plans", "patch_size", "nnunet-rl plan-unpaired")

    other_labels = {**dataset_json, "labels": {"background": 0, "heart": 1}}
    refused(plans, other_labels, "same labels", CT, MR)


def test_rl_u2net_planner_estimates_a_single_channel_primary_with_its_auxiliary_channel():
    estimate = nnUNetPlannerRLU2Net.static_estimate_VRAM_usage
    kwargs = branch_kwargs(PlainConvUNet, 3)
    name = f"{PlainConvUNet.__module__}.{PlainConvUNet.__name__}"
    assert estimate((16, 16, 16), 1, 8, name, kwargs, ()) == estimate((16, 16, 16), 2, 8, name, kwargs, ())


def test_eval_feeds_the_other_branch_its_reference_patch():
    torch.manual_seed(0)
    network = UnpairedDualBranchUNet(1, 1, 3, f"{PlainConvUNet.__module__}.{PlainConvUNet.__name__}",
                                     branch_kwargs(PlainConvUNet, 3), patch_size=(16, 16, 16), aligned_stages=[1, 2],
                                     window_size=2, k_sel=1, temperature=0.1, fusion_weight=0.3,
                                     min_greedy_probability=0.5, deep_supervision=False).eval()
    ct, mri = torch.randn(1, 1, 16, 16, 16), torch.randn(1, 1, 16, 16, 16)
    with pytest.raises(NnunetRLError, match="no reference patches"):
        network(ct)
    network.set_reference("primary", ct)
    network.set_reference("auxiliary", mri)
    with torch.no_grad():
        primary, auxiliary, _ = network.branch_outputs(torch.cat([ct, mri], 1))
        torch.testing.assert_close(network(ct), primary)
        network.predicted_branch = "auxiliary"
        torch.testing.assert_close(network(mri), auxiliary)
    with pytest.raises(NnunetRLError, match="patch size"):
        network(torch.randn(1, 1, 8, 8, 8))


@pytest.mark.e2e
def test_train_predict_and_compare_each_modality(planned, tmp_path):
    env = planned
    results = Path(env["nnUNet_results"])
    cli("nnUNetv2_train", CT_ID, CONFIGURATION, "0", "-tr", OURS, "-device", "cpu", env=env)
    ct_fold = results / CT / f"{OURS}__nnUNetPlans__{CONFIGURATION}" / "fold_0"
    mr_fold = results / MR / f"{OURS}__{MR_PLANS}__{CONFIGURATION}" / "fold_0"
    for fold, dataset, prefix in ((ct_fold, CT, "ct_"), (mr_fold, MR, "mr_")):
        val = load_json(str(Path(env["nnUNet_preprocessed"]) / dataset / "splits_final.json"))[0]["val"]
        assert sorted(p.name for p in (fold / "validation").glob("*.nii.gz")) == sorted(f"{k}.nii.gz" for k in val)
        assert all(key.startswith(prefix) for key in val)
        assert (fold / "validation" / "summary.json").is_file() and (fold / "checkpoint_final.pth").is_file()
    checkpoint = torch.load(ct_fold / "checkpoint_final.pth", weights_only=False)
    assert {"agents", "buffers", "agwd", "pose_generator"} <= set(checkpoint["nnunet_rl"])
    assert not torch.isnan(checkpoint["network_weights"]["reference_auxiliary"]).any()
    assert json.loads((ct_fold / "rl_policy.json").read_text())["modules"]

    # the auxiliary dataset's model folder, written by our trainer, is an nnU-Net model folder like any other
    output = tmp_path / "predictions"
    cli("nnUNetv2_predict", "-i", str(Path(env["nnUNet_raw"]) / MR / "imagesTs"), "-o", str(output), "-d", MR_ID,
        "-p", MR_PLANS, "-c", CONFIGURATION, "-tr", OURS, "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1",
        env=env)
    prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(output / "mr_2001.nii.gz")))
    assert prediction.shape == (24, 24, 24) and set(np.unique(prediction)) <= set(range(8))

    # per-modality Dice against stock nnU-Net trained on that modality alone (on MRI here: the CT side is the
    # standard layout test_e2e.py compares; one stock training keeps this test short)
    cli("nnUNetv2_train", MR_ID, CONFIGURATION, "0", "-tr", STOCK, "-p", MR_PLANS, "-device", "cpu", env=env)
    for dataset_id, dataset, plans, trainers in ((MR_ID, MR, MR_PLANS, [STOCK, OURS]),
                                                 (CT_ID, CT, "nnUNetPlans", [OURS])):
        cli("nnunet-rl", "compare", dataset_id, "-c", CONFIGURATION, "-p", plans, "-tr", *trainers, "-f", "0", env=env)
        summary = json.loads((results / dataset / f"comparison__{plans}__{CONFIGURATION}" / "summary.json")
                             .read_text())
        assert summary["trainers"] == trainers and summary["cases"] == sorted(
            load_json(str(Path(env["nnUNet_preprocessed"]) / dataset / "splits_final.json"))[0]["val"])
        assert summary["statistics"][OURS]["1"]["Dice"]["n"] == len(summary["cases"])
