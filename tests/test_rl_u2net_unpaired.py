"""Unpaired RL-U2Net (MM-WHS as distributed): synthetic MM-WHS-layout CT and MRI of different patients ->
convert-mmwhs -> plan-unpaired -> nnUNetv2_train -> nnUNetv2_predict (each modality) -> compare per modality; each
branch's dataloader holds exactly its own dataset's fold training cases; the reference patches are seeded,
unaugmented and recorded; the joined batch, the per-branch targets and the dataset-view swap; clear errors for bad
set-ups."""
import copy
import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from nnunet_commands import cli, user_environment
from helpers import branch_kwargs

from nnunet_rl.augmenters import WITH_WORKERS, data_loader, stop_workers
from nnunet_rl.datasets.mmwhs import LABEL_MAP
from nnunet_rl.datasets.synthetic import _heart_case
from nnunet_rl.errors import NnunetRLError
from nnunet_rl.mirroring import draw_mirroring, mirror_batch
from nnunet_rl.dual_branch import DualBranchOutput
from nnunet_rl.dual_branch_loss import BranchTargets, DualBranchLoss
from nnunet_rl.trainers import nnUNetTrainerRLU2Net_unpaired_3epochs_2iters as Unpaired
from nnunet_rl.trainers.rl_u2net_unpaired import REFERENCE_KEY
from nnunet_rl.unpaired import JointLoader, UnpairedDualBranchUNet, reference_patch

CT_ID, MR_ID = "971", "972"
CT, MR = "Dataset971_MMWHS_CT", "Dataset972_MMWHS_MR"
CT_PLANS, MR_PLANS = "nnUNetPlans_RLU2Net", "nnUNetPlans_RLU2Net_from971"
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


def preprocessed(env: dict, dataset: str, plans: str = CT_PLANS) -> tuple[dict, dict]:
    folder = Path(env["nnUNet_preprocessed"]) / dataset
    return load_json(str(folder / f"{plans}.json")), load_json(str(folder / "dataset.json"))


def trainer(plans: dict, dataset_json: dict, configuration: str = CONFIGURATION):
    plans = {**copy.deepcopy(plans), "continue_training": False}
    return Unpaired(plans, configuration, 0, dataset_json, torch.device("cpu"))


def fold(env: dict, dataset: str) -> dict:
    return load_json(str(Path(env["nnUNet_preprocessed"]) / dataset / "splits_final.json"))[0]


def test_plans_share_the_topology_and_keep_each_modality_normalisation(nnunet_env):
    ct_plans, _ = preprocessed(nnunet_env, CT)
    mr_plans, mr_json = preprocessed(nnunet_env, MR, MR_PLANS)
    assert ct_plans["experiment_planner_used"] == "nnUNetPlannerRLU2Net"  # fitted to the dual-branch network
    ct, mr = (plans["configurations"][CONFIGURATION] for plans in (ct_plans, mr_plans))
    assert mr["patch_size"] == ct["patch_size"] and mr["spacing"] == ct["spacing"]
    assert mr["architecture"] == ct["architecture"]
    assert ct["normalization_schemes"] == ["CTNormalization"] and mr["normalization_schemes"] == ["ZScoreNormalization"]
    assert mr["rl"]["rl_u2net"] == ct["rl"]["rl_u2net"]
    assert ct["rl"]["rl_u2net"]["unpaired"] == {
        "primary": {"dataset": CT, "plans": CT_PLANS, "channels": ["CT"]},
        "auxiliary": {"dataset": MR, "plans": MR_PLANS, "channels": ["MRI"]}}
    assert mr_json["channel_names"] == {"0": "MRI"}


def test_each_branch_loads_its_fold_and_the_references_are_seeded_unaugmented_and_kept(nnunet_env, tmp_path):
    unpaired = trainer(*preprocessed(nnunet_env, CT))
    unpaired.initialize()
    train, validation = unpaired.get_dataloaders()
    try:
        folds = {dataset: fold(nnunet_env, dataset) for dataset in (CT, MR)}
        loaders = {branch: data_loader(augmenter) for branch, augmenter in train.loaders.items()}
        for branch, dataset, plans in (("primary", CT, CT_PLANS), ("auxiliary", MR, MR_PLANS)):
            assert sorted(loaders[branch].indices) == sorted(folds[dataset]["train"])
            assert Path(loaders[branch]._data.source_folder) == \
                Path(nnunet_env["nnUNet_preprocessed"]) / dataset / f"{plans}_{CONFIGURATION}"
        assert sorted(data_loader(validation).indices) == sorted(folds[CT]["val"])
        batch = next(train)
        assert batch["data"].shape[1] == 2  # CT patch, MRI patch
        assert set(batch["keys"]["primary"]) <= set(folds[CT]["train"])
        assert set(batch["keys"]["auxiliary"]) <= set(folds[MR]["train"])

        # each reference: the recorded crop of a fold training case, as preprocessed (no augmentation), the same
        # when chosen again; the global NumPy generator nnU-Net's dataloaders use is left as it was
        network = unpaired.bare_network
        for branch, view, dataset in (("primary", None, CT), ("auxiliary", unpaired.auxiliary, MR)):
            record = unpaired.reference_records[branch]
            assert record["dataset"] == dataset and record["case"] in folds[dataset]["train"] and record["seed"] == 0
            with unpaired.on_dataset(view) if view is not None else nullcontext():
                loader = unpaired._reference_loader()
            data, _, _, _ = loader._data.load_case(record["case"])
            crop = torch.from_numpy(np.asarray(data)[(slice(None), *(slice(lb, ub) for lb, ub in record["bbox"]))])
            assert tuple(crop.shape[1:]) == tuple(unpaired.configuration_manager.patch_size)  # 24³ in a 24³ patch
            torch.testing.assert_close(network.reference(branch)[0], crop.float())
            state = np.random.get_state()[1].copy()
            patch, again = reference_patch(loader, seed=0)
            assert {**again, "dataset": dataset} == record and torch.equal(patch, network.reference(branch).cpu())
            assert np.array_equal(np.random.get_state()[1], state)
    finally:
        stop_workers(train)
        stop_workers(validation)

    unpaired.save_checkpoint(str(tmp_path / "checkpoint.pth"))  # as --c finds it: loaded before the dataloaders start
    resumed = trainer(*preprocessed(nnunet_env, CT))
    resumed.load_checkpoint(str(tmp_path / "checkpoint.pth"))
    train, validation = resumed.get_dataloaders()
    next(train)
    stop_workers(train)  # the joint loader's: both datasets' augmenters
    stop_workers(validation)
    assert all(isinstance(part, WITH_WORKERS) and not any(p.is_alive() for p in part._processes)
               for part in train.augmenters)
    for branch in ("primary", "auxiliary"):
        assert torch.equal(resumed.bare_network.reference(branch), unpaired.bare_network.reference(branch))
    assert resumed.reference_records == unpaired.reference_records
    assert resumed.rl_policy()[REFERENCE_KEY] == unpaired.reference_records


def test_the_dataset_view_swap_restores_every_attribute_after_an_exception(nnunet_env):
    unpaired = trainer(*preprocessed(nnunet_env, CT))
    unpaired.initialize()
    names = ("preprocessed_dataset_folder_base", "preprocessed_dataset_folder", "plans_manager",
             "configuration_manager", "dataset_json", "output_folder_base", "output_folder", "dataset_class")
    before = {name: getattr(unpaired, name) for name in names}
    with pytest.raises(RuntimeError, match="inside"):
        with unpaired.on_dataset(unpaired.auxiliary):
            assert unpaired.plans_manager.dataset_name == MR and unpaired.dataset_json["channel_names"] == {"0": "MRI"}
            unpaired.dataset_class = int  # what nnU-Net's get_dataloaders sets, kept in the view
            raise RuntimeError("inside")
    assert all(getattr(unpaired, name) is value for name, value in before.items())
    assert unpaired.auxiliary.dataset_class is int


def test_joint_loader_joins_the_patches_and_keeps_each_branch_labels_and_keys():
    def loader(data, target, keys):
        while True:
            yield {"data": data, "target": target, "keys": keys}

    ct, mri = torch.zeros(2, 1, 4, 4, 4), torch.ones(2, 1, 4, 4, 4)
    ct_target = [torch.zeros(2, 1, 4, 4, 4), torch.zeros(2, 1, 2, 2, 2)]
    mri_target = [torch.ones(2, 1, 4, 4, 4), torch.ones(2, 1, 2, 2, 2)]
    batch = next(JointLoader(loader(ct, ct_target, ["ct_a", "ct_b"]), loader(mri, mri_target, ["mr_a", "mr_b"])))
    assert torch.equal(batch["data"], torch.cat([ct, mri], 1))
    assert isinstance(batch["target"], BranchTargets)
    assert batch["target"]["primary"] is ct_target and batch["target"]["auxiliary"] is mri_target
    assert batch["keys"] == {"primary": ["ct_a", "ct_b"], "auxiliary": ["mr_a", "mr_b"]}


def test_branch_targets_are_mirrored_with_their_samples_and_each_branch_is_scored_on_its_own(nnunet_env):
    """BranchTargets through the trainer's mirroring (each sample's flip applied to both branches' targets and the
    image) and through DualBranchLoss (each branch against its own labels)."""
    unpaired = trainer(*preprocessed(nnunet_env, CT))
    unpaired.initialize()
    unpaired.training_mirror_axes = (0, 1, 2)
    data = torch.randn(2, 2, 6, 6, 6)
    targets = BranchTargets({"primary": [torch.randint(0, 8, (2, 1, 6, 6, 6)).float()],
                             "auxiliary": [torch.randint(0, 8, (2, 1, 6, 6, 6)).float()]})
    generator_state = unpaired.pose_generator.get_state()
    mirrored = unpaired._mirrored({"data": data, "target": targets})
    unpaired.bare_network.set_mirroring(None)
    unpaired.pose_generator.set_state(generator_state)
    drawn = draw_mirroring(2, (0, 1, 2), 3, unpaired.pose_generator)  # the flips _mirrored drew
    assert any(group.axes for group in drawn.groups)
    assert isinstance(mirrored["target"], BranchTargets)
    torch.testing.assert_close(mirrored["data"], mirror_batch(data, drawn))
    for branch in ("primary", "auxiliary"):
        torch.testing.assert_close(mirrored["target"][branch][0], mirror_batch(targets[branch][0], drawn))

    loss = DualBranchLoss(unpaired.loss.stock, None, 0.0, 1.0, 1.0, 0.1)
    labels = {"primary": torch.zeros(1, 1, 4, 4, 4), "auxiliary": torch.ones(1, 1, 4, 4, 4)}
    perfect = {branch: torch.full((1, 8, 4, 4, 4), -20.0).index_fill_(1, torch.tensor([int(target[0, 0, 0, 0, 0])]),
                                                                       20.0)
               for branch, target in labels.items()}
    output = DualBranchOutput([perfect["primary"]], [perfect["auxiliary"]], [])  # one deep-supervision scale
    right = loss(output, BranchTargets({branch: [target] for branch, target in labels.items()}))
    right_dice = {branch: float(dice) for branch, dice in loss.last_dice.items()}
    swapped = loss(output, BranchTargets({"primary": [labels["auxiliary"]], "auxiliary": [labels["primary"]]}))
    assert float(right) < float(swapped)
    assert all(float(loss.last_dice[branch]) < right_dice[branch] for branch in labels)


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

    cascade = copy.deepcopy(plans)
    cascade["configurations"]["3d_cascade_fullres"] = {"inherits_from": CONFIGURATION, "previous_stage": "3d_lowres"}
    with pytest.raises(NnunetRLError, match="does not train cascade stages"):
        trainer(cascade, dataset_json, "3d_cascade_fullres").initialize()


def test_rerun_copies_an_edited_rl_block_without_preprocessing_again(nnunet_env):
    """An edited rl block reaches the auxiliary plans by rerunning plan-unpaired; the preprocessed MRI data stay
    (nnU-Net would delete and rewrite the folder); until then the trainer names that mismatch and the fix."""
    from nnunet_rl.plans.unpaired import plan_unpaired
    ct_file = Path(nnunet_env["nnUNet_preprocessed"]) / CT / f"{CT_PLANS}.json"
    original = load_json(str(ct_file))
    mr_plans, _ = preprocessed(nnunet_env, MR, MR_PLANS)
    case = next((Path(nnunet_env["nnUNet_preprocessed"]) / MR /
                 mr_plans["configurations"][CONFIGURATION]["data_identifier"]).iterdir())
    stamp = case.stat().st_ino, case.stat().st_mtime_ns
    edited = copy.deepcopy(original)
    edited["configurations"][CONFIGURATION]["rl"]["rl_u2net"]["fusion_weight"] = 0.25
    ct_file.write_text(json.dumps(edited))
    try:
        with pytest.raises(NnunetRLError, match=f"rl_u2net sections of {CT} and {MR} differ.*the preprocessed data "
                                                f"stay.*nnunet-rl plan-unpaired {CT} {MR}"):
            trainer(edited, preprocessed(nnunet_env, CT)[1]).initialize()
        plan_unpaired(CT, MR, [CONFIGURATION])
        assert preprocessed(nnunet_env, MR, MR_PLANS)[0]["configurations"][CONFIGURATION]["rl"]["rl_u2net"][
            "fusion_weight"] == 0.25
        assert (case.stat().st_ino, case.stat().st_mtime_ns) == stamp
    finally:
        ct_file.write_text(json.dumps(original))
        plan_unpaired(CT, MR, [CONFIGURATION])
    assert preprocessed(nnunet_env, MR, MR_PLANS)[0] == mr_plans


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
    cli("nnUNetv2_train", CT_ID, CONFIGURATION, "0", "-tr", OURS, "-p", CT_PLANS, "-device", "cpu", env=env)
    ct_fold = results / CT / f"{OURS}__{CT_PLANS}__{CONFIGURATION}" / "fold_0"
    mr_fold = results / MR / f"{OURS}__{MR_PLANS}__{CONFIGURATION}" / "fold_0"
    for folder, dataset, prefix in ((ct_fold, CT, "ct_"), (mr_fold, MR, "mr_")):
        val = fold(env, dataset)["val"]
        assert sorted(p.name for p in (folder / "validation").glob("*.nii.gz")) == sorted(f"{k}.nii.gz" for k in val)
        assert all(key.startswith(prefix) for key in val)
        assert (folder / "validation" / "summary.json").is_file()
        assert (folder / "checkpoint_final.pth").is_file() and (folder / "checkpoint_best.pth").is_file()
    checkpoint = torch.load(ct_fold / "checkpoint_final.pth", weights_only=False)
    assert {"agents", "buffers", "agwd", "pose_generator", REFERENCE_KEY} <= set(checkpoint["nnunet_rl"])
    assert not torch.isnan(checkpoint["network_weights"]["reference_auxiliary"]).any()
    policy = json.loads((ct_fold / "rl_policy.json").read_text())
    assert policy["modules"] and policy[REFERENCE_KEY] == checkpoint["nnunet_rl"][REFERENCE_KEY]
    assert policy[REFERENCE_KEY]["auxiliary"]["case"] in fold(env, MR)["train"]

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
                                                 (CT_ID, CT, CT_PLANS, [OURS])):
        cli("nnunet-rl", "compare", dataset_id, "-c", CONFIGURATION, "-p", plans, "-tr", *trainers, "-f", "0", env=env)
        summary = json.loads((results / dataset / f"comparison__{plans}__{CONFIGURATION}" / "summary.json")
                             .read_text())
        assert summary["trainers"] == trainers and summary["cases"] == sorted(fold(env, dataset)["val"])
        assert summary["statistics"][OURS]["1"]["Dice"]["n"] == len(summary["cases"])
