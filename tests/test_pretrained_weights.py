"""``nnunet-rl pretrained-weights``: a stock nnUNetTrainer checkpoint as nnU-Net's -pretrained_weights for the
per-voxel agents' trainers (nnunet_rl.pretrained), and the ``_pretrained`` variants that start the RL phase at once."""
import json
import os
from pathlib import Path

import pytest
import torch
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_rl.cli import main
from nnunet_rl.errors import NnunetRLError
from nnunet_rl.pretrained import (NOT_TRANSFERRED, build_network, convert_stock_checkpoint, find_trainer,
                                  with_stock_weights)
from nnunet_rl.trainers import nnUNetTrainerMRLSeg_pretrained, nnUNetTrainerPixelRL_pretrained
from nnunet_rl.trainer_from_plans import trainer_from_plans

CONFIGURATION = "2d"


def transferred(key: str) -> bool:
    return all(skip not in key for skip in NOT_TRANSFERRED)


def stock_checkpoint(dataset: str, configuration: str, path: Path) -> dict:
    """A stand-in for a stock run's checkpoint_final.pth: nnUNetTrainer's network for the plans, nnU-Net's keys."""
    folder = Path(os.environ["nnUNet_preprocessed"]) / dataset
    plans_manager = PlansManager(json.loads((folder / "nnUNetPlans.json").read_text()))
    dataset_json = json.loads((folder / "dataset.json").read_text())
    configuration_manager = plans_manager.get_configuration(configuration)
    torch.manual_seed(1)
    network = nnUNetTrainer.build_network_architecture(
        plans_manager, configuration_manager,
        determine_num_input_channels(plans_manager, configuration_manager, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=True)
    weights = network.state_dict()
    torch.save({"network_weights": weights, "trainer_name": "nnUNetTrainer",
                "init_args": {"configuration": configuration}}, path)
    return weights


@pytest.fixture(scope="module")
def stock(planned_dataset, tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("stock") / "checkpoint_final.pth"
    return path, stock_checkpoint(planned_dataset, CONFIGURATION, path)


def converted(dataset: str, trainer, stock_path: Path, out: Path) -> tuple[dict, dict]:
    """The converted file's weights and those of a fresh network of the trainer (same seed, built as the CLI does)."""
    torch.manual_seed(0)
    convert_stock_checkpoint(dataset, CONFIGURATION, trainer.__name__, stock_path, out)
    torch.manual_seed(0)
    fresh, _ = build_network(dataset, CONFIGURATION, trainer.__name__, "nnUNetPlans")
    return torch.load(out, weights_only=False)["network_weights"], fresh.state_dict()


def loaded_into_trainer(dataset: str, trainer_class, out: Path):
    """A trainer initialised as nnUNetv2_train does, then nnU-Net's own load_pretrained_weights of ``out``."""
    trainer = trainer_from_plans(dataset, trainer_class, CONFIGURATION)
    trainer.initialize()
    load_pretrained_weights(trainer.network, str(out))
    return trainer


def first_step_is_an_episode(trainer, at_epoch_start=lambda: None) -> None:
    """Epoch 0 of the loaded trainer, as nnU-Net's run_training starts it (``at_epoch_start`` runs after the epoch's
    start): the first training step runs an episode."""
    trainer.on_train_start()
    try:
        trainer.on_train_epoch_start()
        at_epoch_start()
        trainer.train_step(next(trainer.dataloader_train))
        (episode,) = trainer._episodes
        assert episode.losses is not None
    finally:
        trainer.on_train_end()


def test_pixel_rl_takes_the_stock_backbone_and_fresh_heads(planned_dataset, stock, tmp_path):
    stock_path, stock_weights = stock
    out = tmp_path / "pixel_rl.pth"
    weights, fresh = converted(planned_dataset, nnUNetTrainerPixelRL_pretrained, stock_path, out)
    backbone = {key.removeprefix("backbone."): value for key, value in weights.items() if key.startswith("backbone.")}
    assert backbone.keys() == stock_weights.keys()
    assert all(torch.equal(value, stock_weights[key]) for key, value in backbone.items() if transferred(key))
    heads = [key for key in weights if key.startswith("actor_critic.")]
    assert heads and all(torch.equal(weights[key], fresh[key]) for key in heads)

    trainer = loaded_into_trainer(planned_dataset, nnUNetTrainerPixelRL_pretrained, out)
    assert trainer.rl_start_epoch == 0 and trainer.in_rl_phase()
    state = trainer.bare_network.state_dict()
    assert all(torch.equal(state[f"backbone.{key}"], value) for key, value in stock_weights.items()
               if transferred(key))
    assert all(torch.equal(state[key], fresh[key]) for key in heads)
    first_step_is_an_episode(trainer)


def test_mrl_seg_takes_the_stock_segmentation_net_and_warm_starts_the_reinforcement_encoder(planned_dataset, stock,
                                                                                          tmp_path):
    stock_path, stock_weights = stock
    out = tmp_path / "mrl_seg.pth"
    weights, fresh = converted(planned_dataset, nnUNetTrainerMRLSeg_pretrained, stock_path, out)
    segmentation = {key.removeprefix("segmentation."): value for key, value in weights.items()
                    if key.startswith("segmentation.")}
    assert segmentation.keys() == stock_weights.keys()
    assert all(torch.equal(value, stock_weights[key]) for key, value in segmentation.items() if transferred(key))
    body = {key.removeprefix("reinforcement.encoder.body."): value for key, value in weights.items()
            if key.startswith("reinforcement.encoder.body.")}
    assert body and all(torch.equal(value, stock_weights[f"encoder.{key}"]) for key, value in body.items())
    agents = [key for key in weights if key.startswith("reinforcement.") and ".body." not in key]
    assert any(".actor_critic." in key for key in agents) and any(".project." in key for key in agents)
    assert all(torch.equal(weights[key], fresh[key]) for key in agents)

    trainer = loaded_into_trainer(planned_dataset, nnUNetTrainerMRLSeg_pretrained, out)
    assert trainer.rl_start_epoch == 0 and trainer.pretrain
    state = trainer.bare_network.state_dict()
    assert all(torch.equal(state[key], value) for key, value in weights.items() if transferred(key))
    network = trainer.bare_network
    with torch.no_grad():
        for parameter in network.reinforcement.encoder.body.parameters():
            parameter.zero_()

    def warm_started_again():  # epoch 0 of _pretrained repeats the copy from the loaded Segmentation-Net
        source = network.segmentation.encoder.state_dict()
        assert all(torch.equal(value, source[key]) for key, value in
                   network.reinforcement.encoder.body.state_dict().items())
    first_step_is_an_episode(trainer, warm_started_again)


def test_cli_writes_the_file_and_refuses_another_architecture_or_trainer(planned_dataset, stock, tmp_path, capsys):
    stock_path, _ = stock
    out = tmp_path / "cli.pth"
    main(["pretrained-weights", planned_dataset, "-c", CONFIGURATION, "-tr", "nnUNetTrainerPixelRL", "-i",
          str(stock_path), "-o", str(out)])
    assert out.is_file() and "-pretrained_weights" in capsys.readouterr().out

    other = tmp_path / "3d.pth"
    stock_checkpoint(planned_dataset, "3d_fullres", other)
    with pytest.raises(NnunetRLError, match=r"3d_fullres.*does not fit.*(missing|another shape)"):
        convert_stock_checkpoint(planned_dataset, CONFIGURATION, "nnUNetTrainerMRLSeg", other, tmp_path / "x.pth")
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrained-weights", planned_dataset, "-c", CONFIGURATION, "-tr", "nnUNetTrainerPixelRL", "-i",
              str(other), "-o", str(tmp_path / "y.pth")])
    assert exit_info.value.code == 2 and "does not fit" in capsys.readouterr().err
    with pytest.raises(NnunetRLError, match="does not extend the planned one"):
        convert_stock_checkpoint(planned_dataset, CONFIGURATION, "nnUNetTrainerRLDeepSup", stock_path,
                                 tmp_path / "z.pth")
    assert not (tmp_path / "x.pth").exists() and not (tmp_path / "y.pth").exists()


@pytest.mark.parametrize("trainer_name", ["nnUNetTrainerPAM", "nnUNetTrainerAWSnet"])
def test_pixel_attention_takes_the_stock_network_and_fresh_gates(planned_dataset, stock, tmp_path, capsys,
                                                                  trainer_name):
    """Every stock entry but the seg layers goes to the gated stage of its name; the gates stay as a fresh network
    of the trainer has them, and the CLI names them; nnU-Net's own -pretrained_weights loads the file."""
    from nnunet_rl import trainers
    stock_path, stock_weights = stock
    out = tmp_path / "pam.pth"
    torch.manual_seed(0)
    main(["pretrained-weights", planned_dataset, "-c", CONFIGURATION, "-tr", trainer_name, "-i", str(stock_path),
          "-o", str(out)])
    printed = capsys.readouterr().out
    weights = torch.load(out, weights_only=False)["network_weights"]
    torch.manual_seed(0)
    fresh = build_network(planned_dataset, CONFIGURATION, trainer_name, "nnUNetPlans")[0].state_dict()
    gates = [key for key in weights if ".gate." in key]
    as_stock = {key.replace(".stage.", ".", 1): value for key, value in weights.items() if key not in gates}
    assert gates and as_stock.keys() == stock_weights.keys()
    assert all(torch.equal(value, stock_weights[key]) for key, value in as_stock.items() if transferred(key))
    assert all(torch.equal(weights[key], fresh[key]) for key in gates)
    assert "decoder.stages.0.gate.project_skip.0" in printed and "-pretrained_weights" in printed

    trainer = loaded_into_trainer(planned_dataset, getattr(trainers, trainer_name), out)
    loaded = trainer.network.state_dict()
    assert all(torch.equal(loaded[key], weights[key]) for key in weights if transferred(key))


def test_rl_deep_supervision_takes_a_stock_checkpoint_with_nnunets_own_flag(planned_dataset, stock):
    """RLDeepSup trains stock's planned network (its RL weights the deep-supervision outputs): nnU-Net's own
    -pretrained_weights loads a stock checkpoint unchanged, every key but the seg layers transferred."""
    from nnunet_rl.trainers import nnUNetTrainerRLDeepSup
    stock_path, stock_weights = stock
    trainer = loaded_into_trainer(planned_dataset, nnUNetTrainerRLDeepSup, stock_path)
    loaded = trainer.network.state_dict()
    assert set(loaded) == set(stock_weights)
    assert all(torch.equal(loaded[key], stock_weights[key]) for key in loaded if transferred(key))


def test_rl_u2net_branches_take_the_stock_network_each_its_own_input_channels(planned_dataset, stock, tmp_path,
                                                                               capsys):
    """Each branch of the paired dual-branch network takes every stock entry but the seg layers, its first convolution
    only the input channels the branch sees; the RL-XAlign modules stay fresh and the CLI names them; nnU-Net's own
    -pretrained_weights loads the file. The unpaired trainer is refused."""
    from nnunet_rl.trainers import nnUNetTrainerRLU2Net
    stock_path, stock_weights = stock
    out = tmp_path / "rl_u2net.pth"
    main(["pretrained-weights", planned_dataset, "-c", CONFIGURATION, "-tr", "nnUNetTrainerRLU2Net", "-i",
          str(stock_path), "-o", str(out)])
    printed = capsys.readouterr().out
    weights, fresh = converted(planned_dataset, nnUNetTrainerRLU2Net, stock_path, tmp_path / "again.pth")
    first_conv = stock_weights["encoder.stages.0.0.convs.0.conv.weight"]
    assert first_conv.shape[1] == 2
    for direction, channel in (("primary", 0), ("auxiliary", 1)):
        branch = {key.removeprefix(f"{direction}_branch."): value for key, value in weights.items()
                  if key.startswith(f"{direction}_branch.")}
        assert branch.keys() == stock_weights.keys()
        for key, value in branch.items():  # the first convolution has several names (nnU-Net's aliases)
            expected = first_conv[:, [channel]] if stock_weights[key].data_ptr() == first_conv.data_ptr() \
                else stock_weights[key]
            assert not transferred(key) or torch.equal(value, expected), key
    xalign = [key for key in weights if key.startswith("xalign.")]
    assert xalign and all(torch.equal(weights[key], fresh[key]) for key in xalign)
    assert "xalign." in printed and "-pretrained_weights" in printed

    trainer = loaded_into_trainer(planned_dataset, nnUNetTrainerRLU2Net, tmp_path / "again.pth")
    loaded = trainer.network.state_dict()
    assert all(torch.equal(loaded[key], weights[key]) for key in weights if transferred(key))
    network, _ = build_network(planned_dataset, CONFIGURATION, "nnUNetTrainerRLU2Net", "nnUNetPlans")
    one_channel = {key: value[:, :1] if value.data_ptr() == first_conv.data_ptr() else value
                   for key, value in stock_weights.items()}
    with pytest.raises(NnunetRLError, match="sees 1 channels, the dataset has 2"):
        with_stock_weights(network, one_channel, "one-channel.pth", "RL-U2Net")
    with pytest.raises(NnunetRLError, match="two datasets"):
        convert_stock_checkpoint(planned_dataset, CONFIGURATION, "nnUNetTrainerRLU2Net_unpaired", stock_path,
                                 tmp_path / "unpaired.pth")


@pytest.mark.parametrize("trainer_name", ["nnUNetTrainerAllSliceFusion", "nnUNetTrainerClassifierGuided"])
def test_two_stage_trainers_are_refused_with_the_trainers_it_converts(trainer_name):
    """Their networks take other inputs than the planned network's (all slices; the first stage's maps)."""
    with pytest.raises(NnunetRLError, match="does not extend the planned one.*nnUNetTrainerPixelRL"):
        find_trainer(trainer_name)
