"""The classifier-guided refinement stage (nnunet_rl.classifier_guided): gating of targets and logits, eq. 1's loss
on nnU-Net's own, the network's input channels and head; the <X>_refine configurations
(nnunet_rl.plans.classifier_guided) chained with nnU-Net's cascade keys; nnUNetTrainerClassifierGuided's refusals."""
import os
from pathlib import Path

import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch.nn import functional as F

from nnunet_rl.classifier_guided import (PRESENCE_LOSS_WEIGHT, ClassifierGuidedNetwork, PresenceGatedLoss,
                                         PresenceHead, gated_logits, gated_target, presence_labels)
from nnunet_rl.errors import NnunetRLError
from nnunet_rl.plans.all_slice_fusion import all_slice_configuration
from nnunet_rl.plans.classifier_guided import add_refine_configuration, chain_next_stages, first_stage_of
from nnunet_rl.trainers.classifier_guided import (nnUNetTrainerClassifierGuided,
                                                  nnUNetTrainerClassifierGuided_imageInput,
                                                  nnUNetTrainerClassifierGuided_noGate, previous_stage_predictions)

FOREGROUND = [1, 2, 3]
GATE = 4


def test_gated_target_marks_only_the_absent_classes_voxels():
    target = torch.tensor([[0, 1, 2, 3], [3, 3, 1, 0]]).view(2, 1, 4)
    present = torch.tensor([[True, False, True], [False, True, True]])
    assert gated_target(target, present, FOREGROUND, GATE).view(2, 4).tolist() == [[0, 1, GATE, 3], [3, 3, GATE, 0]]
    assert presence_labels(target, FOREGROUND).tolist() == [[1, 1, 1], [1, 0, 1]]


def test_gated_logits_never_output_an_absent_class_and_keep_the_rest():
    logits = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(0)) * 10
    logits[:, 2] += 50  # class 2 would win everywhere
    presence = torch.tensor([[-1.0, -2.0, 3.0], [4.0, 0.5, 1.0], [-0.1, -0.1, -0.1]])
    gated = gated_logits(logits, presence)
    assert torch.isfinite(gated).all()
    winners = gated.argmax(dim=1)
    for sample, calls in enumerate(presence > 0):
        for index, present in enumerate(calls):
            if present:
                assert torch.equal(gated[sample, index + 1], logits[sample, index + 1])
            else:
                assert not (winners[sample] == index + 1).any()
    assert torch.equal(gated[:, 0], logits[:, 0])
    assert (winners[2] == 0).all()  # every foreground class absent: background


def test_the_head_pools_what_instance_normalisation_leaves():
    """After instance normalisation a channel's mean over the patch is the same with and without a small structure;
    its maximum is not, so the head sees the difference."""
    empty = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    structure = empty.clone()
    structure[..., 6:9, 6:9] += 8.0
    normalised = [F.leaky_relu(F.instance_norm(x)) for x in (empty, structure)]
    assert abs(float(normalised[0].mean() - normalised[1].mean())) < 0.1
    head = PresenceHead(1, 1)
    with torch.no_grad():
        head.mlp[0].weight.fill_(1.0), head.mlp[0].bias.zero_(), head.mlp[2].weight.fill_(1.0), head.mlp[2].bias.zero_()
        assert head(normalised[1]) > head(normalised[0]) + 1.0


def dice_and_ce(ignore_label: int) -> DC_and_CE_loss:
    """nnU-Net's loss as its trainer builds it for labels without regions."""
    return DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=ignore_label, dice_class=MemoryEfficientSoftDiceLoss)


def test_the_loss_is_equation_1_on_nnunets_loss():
    """½[sign(p_i − 0.5) + 1]·CE_seg,i: the voxels of a class called absent leave nnU-Net's CE and Dice; λ = 0.1
    times the head's cross-entropy is added; only the head's parameters get the classification gradient."""
    generator = torch.Generator().manual_seed(1)
    output = torch.randn(2, 4, 8, 8, generator=generator, requires_grad=True)
    target = torch.randint(0, 4, (2, 1, 8, 8), generator=generator)
    presence = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 1.0, 1.0]], requires_grad=True)
    loss = PresenceGatedLoss(dice_and_ce(GATE), lambda: presence, FOREGROUND, GATE)(output, target)
    present = presence.detach() > 0
    expected = dice_and_ce(GATE)(output, gated_target(target, present, FOREGROUND, GATE)) + PRESENCE_LOSS_WEIGHT * \
        F.binary_cross_entropy_with_logits(presence, presence_labels(target, FOREGROUND))
    assert torch.allclose(loss, expected)
    assert not torch.allclose(loss, dice_and_ce(GATE)(output, target) + PRESENCE_LOSS_WEIGHT *
                              F.binary_cross_entropy_with_logits(presence, presence_labels(target, FOREGROUND)))
    loss.backward()
    assert presence.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def refine_plans(planned_dataset) -> PlansManager:
    """The session's nnU-Net plans with 2d_allslice and what nnunet-rl plan -c 2d_refine 2d_allslice_refine
    3d_fullres_refine adds (in memory: the session's plans files stay as other modules expect them)."""
    folder = Path(os.environ["nnUNet_preprocessed"]) / planned_dataset
    plans = load_json(str(folder / "nnUNetPlans.json"))
    plans["configurations"]["2d_allslice"] = all_slice_configuration(
        plans, load_json(str(folder / "dataset_fingerprint.json")))
    for name in ("2d_refine", "2d_allslice_refine", "3d_fullres_refine"):
        add_refine_configuration(plans, name, "nnUNetTrainerAllSliceFusion" if "allslice" in name else "nnUNetTrainer")
    return PlansManager(plans)


def test_refine_configurations_chain_to_their_first_stage_the_cascade_way(refine_plans):
    get = refine_plans.get_configuration
    assert first_stage_of("2d_allslice_refine") == "2d_allslice"
    for refine, first, architecture in [("2d_refine", "2d", "2d"), ("2d_allslice_refine", "2d_allslice", "2d"),
                                        ("3d_fullres_refine", "3d_fullres", "3d_fullres")]:
        assert get(refine).previous_stage_name == first and get(first).next_stage_names == [refine]
        assert get(refine).next_stage_names is None
        for key in ("data_identifier", "patch_size", "architecture", "spacing"):
            assert get(refine).configuration[key] == get(architecture).configuration[key]
    assert get("2d_allslice").configuration["inherits_from"] == "2d"  # and does not inherit 2d's next stage
    assert refine_plans.plans["configurations"]["2d_allslice_refine"]["previous_stage_trainer"] == \
        "nnUNetTrainerAllSliceFusion"
    with pytest.raises(NnunetRLError, match="not a refinement configuration"):
        first_stage_of("2d")
    with pytest.raises(NnunetRLError, match="no 3d_lowres configuration to refine"):
        add_refine_configuration({**refine_plans.plans, "configurations": {}}, "3d_lowres_refine", "nnUNetTrainer")


def test_replanning_keeps_the_chain_and_the_first_stage_trainer(refine_plans, planned_dataset):
    """Rewriting the first stage (nnunet-rl plan -c 2d_allslice again) and the refinement without naming a trainer
    keep what nnU-Net's cascade needs: the first stage's next_stage and the recorded first-stage trainer."""
    import copy
    plans = copy.deepcopy(refine_plans.plans)
    fingerprint = load_json(str(Path(os.environ["nnUNet_preprocessed"]) / planned_dataset /
                                "dataset_fingerprint.json"))
    plans["configurations"]["2d_allslice"] = all_slice_configuration(plans, fingerprint)  # what plan_rl rewrites
    assert PlansManager(plans).get_configuration("2d_allslice").next_stage_names != ["2d_allslice_refine"]
    chain_next_stages(plans)  # what plan_rl does last
    assert PlansManager(plans).get_configuration("2d_allslice").next_stage_names == ["2d_allslice_refine"]
    add_refine_configuration(plans, "2d_allslice_refine", None)
    assert plans["configurations"]["2d_allslice_refine"]["previous_stage_trainer"] == "nnUNetTrainerAllSliceFusion"
    add_refine_configuration(plans, "2d_allslice_refine", "nnUNetTrainer_3epochs_2iters")
    assert plans["configurations"]["2d_allslice_refine"]["previous_stage_trainer"] == "nnUNetTrainer_3epochs_2iters"
    for refine, usual in (("2d_allslice_refine", "nnUNetTrainerAllSliceFusion"), ("2d_refine", "nnUNetTrainer")):
        del plans["configurations"][refine]  # planned for the first time, no trainer named: the first stage's usual
        add_refine_configuration(plans, refine, None)
        assert plans["configurations"][refine]["previous_stage_trainer"] == usual


def build(trainer_class, refine_plans, deep_supervision: bool = True) -> ClassifierGuidedNetwork:
    torch.manual_seed(0)
    return trainer_class.build_network_architecture(refine_plans, refine_plans.get_configuration("2d_refine"),
                                                    1 + len(FOREGROUND), 1 + len(FOREGROUND), deep_supervision)


def test_the_network_sees_the_first_stage_or_the_image_and_gates_in_eval_mode(refine_plans):
    """nnU-Net's cascade input is [image, one-hot of the first stage]: the refinement sees only the one-hot channels,
    _imageInput only the image; in eval mode (prediction) a class the head calls absent is not output, unless
    _noGate; in training mode the planned network's deep-supervision outputs come back ungated."""
    patch = refine_plans.get_configuration("2d_refine").patch_size
    x = torch.randn(2, 1 + len(FOREGROUND), *patch, generator=torch.Generator().manual_seed(2))
    changed_image, changed_segmentation = x.clone(), x.clone()
    changed_image[:, 0] += 5
    changed_segmentation[:, 1:] = 1 - changed_segmentation[:, 1:]
    ours, image_input = build(nnUNetTrainerClassifierGuided, refine_plans, False).eval(), \
        build(nnUNetTrainerClassifierGuided_imageInput, refine_plans, False).eval()
    with torch.no_grad():
        assert torch.equal(ours(x), ours(changed_image)) and not torch.equal(ours(x), ours(changed_segmentation))
        assert torch.equal(image_input(x), image_input(changed_segmentation))
        assert not torch.equal(image_input(x), image_input(changed_image))
        ours.presence_head.mlp[-1].bias.fill_(-100.0)  # every class absent
        assert (ours(x).argmax(dim=1) == 0).all()
        no_gate = build(nnUNetTrainerClassifierGuided_noGate, refine_plans, False).eval()
        no_gate.load_state_dict(ours.state_dict())
        assert (no_gate(x).argmax(dim=1) != 0).any()
    training = build(nnUNetTrainerClassifierGuided, refine_plans, True).train()
    outputs = training(x)
    assert isinstance(outputs, (list, tuple)) and outputs[0].shape == (2, 1 + len(FOREGROUND), *patch)
    assert training.presence_logits.shape == (2, len(FOREGROUND))
    sum(output.sum() for output in outputs).add(training.presence_logits.sum()).backward()
    assert training.presence_head.mlp[0].weight.grad.abs().sum() > 0


def test_the_trainer_refuses_a_configuration_without_a_first_stage(refine_plans, planned_dataset):
    dataset_json = load_json(str(Path(os.environ["nnUNet_preprocessed"]) / planned_dataset / "dataset.json"))
    with pytest.raises(NnunetRLError, match="nnunet-rl plan DATASET -c 2d_refine"):
        nnUNetTrainerClassifierGuided({**refine_plans.plans, "continue_training": False}, "2d", 0, dataset_json,
                                      torch.device("cpu"))
    trainer = nnUNetTrainerClassifierGuided({**refine_plans.plans, "continue_training": False}, "2d_allslice_refine",
                                            0, dataset_json, torch.device("cpu"))
    assert Path(trainer.folder_with_segs_from_previous_stage) == previous_stage_predictions(
        refine_plans, refine_plans.get_configuration("2d_allslice_refine"), "2d_allslice_refine")
    assert Path(trainer.folder_with_segs_from_previous_stage).parts[-4:] == (
        planned_dataset, "nnUNetTrainerAllSliceFusion__nnUNetPlans__2d_allslice", "predicted_next_stage",
        "2d_allslice_refine")
    with pytest.raises(NnunetRLError, match="lacks the first stage's prediction"):
        trainer.require_previous_stage_predictions()


def test_the_trainer_refuses_region_based_labels(refine_plans, planned_dataset, monkeypatch):
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    dataset_json = load_json(str(Path(os.environ["nnUNet_preprocessed"]) / planned_dataset / "dataset.json"))
    monkeypatch.setattr(LabelManager, "has_regions", property(lambda self: True))
    with pytest.raises(NnunetRLError, match="region-based labels are not supported"):
        nnUNetTrainerClassifierGuided({**refine_plans.plans, "continue_training": False}, "2d_allslice_refine", 0,
                                      dataset_json, torch.device("cpu"))


def test_a_gated_pass_outweighs_an_ungated_one_in_nnunets_averaging():
    """nnU-Net averages logits over mirrored passes and Gaussian-weighted windows: a pass or window that gates a class
    keeps it out even beside a confident ungated one."""
    logits = torch.zeros(1, 4, 2, 2)
    logits[:, 2] = 15.0
    gated = gated_logits(logits, torch.tensor([[1.0, -1.0, 1.0]]))
    assert ((3 * gated + logits) / 4).argmax(dim=1).ne(2).all()  # 3 of 4 mirrored passes gate class 2
    assert (0.7 * gated + 0.3 * logits).argmax(dim=1).ne(2).all()  # the nearer window gates, the farther does not
    assert torch.isfinite((gated.half() * 8).float()).all()  # eight overlapping windows summed in float16


def initialized_on(refine_plans, planned_dataset, configuration: str) -> nnUNetTrainerClassifierGuided:
    """nnUNetTrainerClassifierGuided on ``configuration``, initialised (network, optimiser, loss) as nnUNetv2_train
    does."""
    dataset_json = load_json(str(Path(os.environ["nnUNet_preprocessed"]) / planned_dataset / "dataset.json"))
    trainer = nnUNetTrainerClassifierGuided({**refine_plans.plans, "continue_training": False}, configuration, 0,
                                            dataset_json, torch.device("cpu"))
    trainer.initialize()
    return trainer


@pytest.fixture(scope="module")
def initialized(refine_plans, planned_dataset) -> nnUNetTrainerClassifierGuided:
    return initialized_on(refine_plans, planned_dataset, "2d_refine")


def call_absent(network: ClassifierGuidedNetwork, absent_index: int) -> None:
    """Make the head call foreground class ``absent_index`` absent and every other present, whatever the input."""
    last = network.presence_head.mlp[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(5.0)
        last.bias[absent_index] = -5.0


def test_the_trainers_loss_drops_gated_voxels_at_every_deep_supervision_scale(initialized):
    """The loss nnUNetTrainerClassifierGuided builds (nnU-Net's Dice + CE with deep supervision, the gate label as its
    ignore label): no gradient reaches the outputs at voxels of a class the head calls absent, at any scale."""
    network, labels = initialized.network.train(), initialized.label_manager.foreground_labels
    call_absent(network, 0)
    patch = initialized.configuration_manager.patch_size
    x = torch.randn(2, network.input_channels.stop, *patch, generator=torch.Generator().manual_seed(3))
    outputs = network(x)
    for output in outputs:
        output.retain_grad()
    generator = torch.Generator().manual_seed(4)
    targets = [torch.randint(0, len(labels) + 1, (2, 1, *output.shape[2:]), generator=generator).float()
               for output in outputs]
    initialized.loss(outputs, targets).backward()
    for output, target in zip(outputs, targets):  # nnU-Net gives the lowest scale weight 0: no gradient at all
        gated = (target == labels[0]).expand_as(output)
        assert gated.any() and (output.grad is None or output.grad[gated].abs().max() == 0)
    assert outputs[0].grad[~(targets[0] == labels[0]).expand_as(outputs[0])].abs().sum() > 0


def test_nnunets_predictor_never_outputs_a_class_the_head_calls_absent(initialized):
    """Through nnU-Net's predictor (sliding window, mirroring): a class the network would predict everywhere is gone
    when the head calls it absent, and back with the same weights in _noGate."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    network, labels = initialized.network, initialized.label_manager.foreground_labels
    call_absent(network, 0)
    with torch.no_grad():
        network.decoder.seg_layers[-1].bias[labels[0]] = 50.0  # the first foreground class wins everywhere
    network.decoder.deep_supervision = False  # as nnUNetv2_predict builds it
    no_gate = nnUNetTrainerClassifierGuided_noGate.build_network_architecture(
        initialized.plans_manager, initialized.configuration_manager, initialized.num_input_channels,
        initialized.label_manager.num_segmentation_heads, False)
    no_gate.load_state_dict(network.state_dict())
    data = torch.randn(network.input_channels.stop, 3, *initialized.configuration_manager.patch_size)
    winners = {}
    for name, model in (("gated", network.eval()), ("not gated", no_gate.eval())):
        predictor = nnUNetPredictor(perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                                    allow_tqdm=False)
        predictor.manual_initialization(model, initialized.plans_manager, initialized.configuration_manager,
                                        [model.state_dict()], initialized.dataset_json, "nnUNetTrainerClassifierGuided",
                                        (0, 1))
        winners[name] = predictor.predict_sliding_window_return_logits(data).argmax(dim=0)
    assert not (winners["gated"] == labels[0]).any() and (winners["not gated"] == labels[0]).all()


def two_stage_ddp_rank(rank: int, folder: str) -> None:
    """One DDP worker (gloo, CPU): each stage's trainer as nnU-Net builds it under DDP (batch split, its loss on
    the DDP-wrapped network), two SGD steps on a batch of this rank's own."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from torch.nn.parallel import DistributedDataParallel as DDP

    from nnunet_rl.trainers.all_slice_fusion import nnUNetTrainerAllSliceFusion
    plans, dataset_json = load_json(os.path.join(folder, "plans.json")), load_json(os.path.join(folder,
                                                                                                "dataset.json"))
    results = {}
    for trainer_class, configuration in ((nnUNetTrainerAllSliceFusion, "2d_allslice"),
                                         (nnUNetTrainerClassifierGuided, "2d_refine")):
        trainer = trainer_class({**plans, "continue_training": False}, configuration, 0, dataset_json,
                                torch.device("cpu"))
        trainer._set_batch_size_and_oversample()
        torch.manual_seed(rank)  # DDP starts every worker from rank 0's weights
        channels = determine_num_input_channels(trainer.plans_manager, trainer.configuration_manager, dataset_json)
        network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, channels,
                                                     trainer.label_manager.num_segmentation_heads, True)
        trainer.network = DDP(network)
        trainer.loss = trainer._build_loss()
        initial = {key: value.clone() for key, value in network.state_dict().items()}
        optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.99, nesterov=True)
        generator = torch.Generator().manual_seed(10 + rank)
        for _ in range(2):
            x = torch.randn(trainer.batch_size, channels, *trainer.configuration_manager.patch_size,
                            generator=generator)
            outputs = trainer.network(x)
            targets = [torch.randint(0, len(FOREGROUND) + 1, (output.shape[0], 1, *output.shape[2:]),
                                     generator=generator).float() for output in outputs]
            optimizer.zero_grad()
            trainer.loss(outputs, targets).backward()
            optimizer.step()
        results[configuration] = {"batch_size": trainer.batch_size, "oversample": trainer.oversample_foreground_percent,
                                  "initial": initial, "final": network.state_dict()}
    torch.save(results, os.path.join(folder, f"rank{rank}.pt"))


def test_both_stages_train_under_ddp(refine_plans, planned_dataset, tmp_path):
    """Two gloo workers: a planned batch of one stack becomes one stack per worker (nnU-Net's oversampling rule over
    the two), the refinement's batch is split the nnU-Net way, and both networks (transformers, presence head) stay
    identical on the workers and move: DDP finds no unused parameter and the loss reads the head through it."""
    from batchgenerators.utilities.file_and_folder_operations import save_json
    from helpers import on_two_gloo_ranks
    import copy
    plans = copy.deepcopy(refine_plans.plans)
    plans["configurations"]["2d_allslice"]["batch_size"] = 1
    save_json(plans, str(tmp_path / "plans.json"))
    save_json(load_json(str(Path(os.environ["nnUNet_preprocessed"]) / planned_dataset / "dataset.json")),
              str(tmp_path / "dataset.json"))
    ranks = on_two_gloo_ranks(two_stage_ddp_rank, tmp_path)
    stacks, refine = [rank["2d_allslice"] for rank in ranks], [rank["2d_refine"] for rank in ranks]
    assert [rank["batch_size"] for rank in stacks] == [1, 1] and [rank["oversample"] for rank in stacks] == [0.0, 1.0]
    assert sum(rank["batch_size"] for rank in refine) == refine_plans.get_configuration("2d_refine").batch_size
    for rank0, rank1, moved in ((stacks[0], stacks[1], "fusion."), (refine[0], refine[1], "presence_head.")):
        for key, value in rank0["final"].items():
            torch.testing.assert_close(rank1["final"][key], value, rtol=0, atol=0)
        assert any(not torch.equal(value, rank0["initial"][key]) for key, value in rank0["final"].items()
                   if key.startswith(moved))


def test_the_3d_refinement_trains_and_gates_like_the_2d_one(refine_plans, planned_dataset):
    """3d_fullres_refine: the planned 3D U-Net on the first stage's one-hot channels; a training step through the
    trainer's loss reaches the head, and in eval mode a class the head calls absent is not output."""
    trainer = initialized_on(refine_plans, planned_dataset, "3d_fullres_refine")
    network, labels = trainer.network.train(), trainer.label_manager.foreground_labels
    patch = trainer.configuration_manager.patch_size
    assert len(patch) == 3 and network.input_channels.stop == trainer.num_input_channels
    x = torch.randn(2, trainer.num_input_channels, *patch, generator=torch.Generator().manual_seed(5))
    outputs = network(x)
    generator = torch.Generator().manual_seed(6)
    targets = [torch.randint(0, len(labels) + 1, (2, 1, *output.shape[2:]), generator=generator).float()
               for output in outputs]
    trainer.loss(outputs, targets).backward()
    assert network.presence_head.mlp[0].weight.grad.abs().sum() > 0
    call_absent(network, 0)
    network.decoder.deep_supervision = False
    with torch.no_grad():
        network.decoder.seg_layers[-1].bias[labels[0]] = 50.0  # the first foreground class would win everywhere
        assert not (network.eval()(x).argmax(dim=1) == labels[0]).any()
        network.gate_output = False  # _noGate's behaviour, the same weights
        assert (network(x).argmax(dim=1) == labels[0]).all()
