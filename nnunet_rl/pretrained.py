"""A stock nnU-Net checkpoint as ``-pretrained_weights`` for the trainers whose network extends the planned one
(``nnunet-rl pretrained-weights``): the per-voxel agents' trainers and those with AWSnet's pixel attention.

nnU-Net's ``nnUNetv2_train ... -pretrained_weights FILE`` (``nnunetv2/run/load_pretrained_weights.py``) requires every
key of the trainer's network's state dict, except those containing ``.seg_layers.``, in the file's
``network_weights`` with the same shape, and transfers those keys. The networks of ``nnUNetTrainerPixelRL`` and
``nnUNetTrainerMRLSeg`` hold the planned network under a prefix (``backbone.``; ``segmentation.``) next to the agents'
modules, so a stock ``nnUNetTrainer`` checkpoint is refused. :func:`convert_stock_checkpoint` writes the file nnU-Net
accepts: the trainer's network built from the plans as ``nnUNetv2_predict`` builds it (the trainer class's
``build_network_architecture``), its planned part loaded from the stock checkpoint under nnU-Net's rules (every key
but the seg layers present with the same shape; the seg layers not transferred, so ``nnUNetv2_train`` starts them
afresh as it does for any ``-pretrained_weights``), the agents as freshly initialised, and for MRL-Seg the
Reinforcement-Net's encoder copied from the loaded Segmentation-Net's as the in-run pre-training does at the first RL
epoch (:meth:`~nnunet_rl.mrl_seg.ReinforcementEncoder.initialise_from`). The networks of ``nnUNetTrainerPAM`` and
``nnUNetTrainerAWSnet`` are the planned network with each decoder stage wrapped beside a gate
(``decoder.stages.<s>.stage.``, ``decoder.stages.<s>.gate.``): the stock weights go to the wrapped stages under
their stock names (:func:`nnunet_rl.pam.stock_name`), the gates stay as initialised. The network of
``nnUNetTrainerRLU2Net`` is two planned networks, one per channel group (``primary_branch.``, ``auxiliary_branch.``),
joined by RL-XAlign modules: each branch takes the stock weights, its input convolution only the input channels the
branch sees (:func:`per_branch_stock_weights`), and the RL-XAlign modules stay as initialised. The conversion says which
entries it did not take from the checkpoint.
"""
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from nnunet_rl.errors import NnunetRLError
from nnunet_rl.nnunet_folders import dataset_name as nnunet_dataset_name, require_nnunet_folders

# keys containing these nnU-Net's load_pretrained_weights neither requires nor transfers (skip_strings_in_pretrained)
NOT_TRANSFERRED = (".seg_layers.",)
SHOWN_KEYS = 5


def transferred(key: str) -> bool:
    return all(skip not in key for skip in NOT_TRANSFERRED)


def read_stock_weights(checkpoint: Path) -> tuple[dict, str]:
    """The checkpoint's ``network_weights`` (on the CPU) and a few words on what it is (trainer, configuration)."""
    if not checkpoint.is_file():
        raise NnunetRLError(f"{checkpoint} does not exist")
    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for files that are not checkpoints
        raise NnunetRLError(f"cannot read {checkpoint} as a PyTorch checkpoint: {error}") from error
    if not isinstance(saved, dict) or "network_weights" not in saved:
        raise NnunetRLError(f"{checkpoint} holds no 'network_weights': not an nnU-Net checkpoint "
                            f"(checkpoint_final.pth or checkpoint_best.pth of a fold folder)")
    origin = [f"trainer {saved['trainer_name']}"] if "trainer_name" in saved else []
    if isinstance(saved.get("init_args"), dict) and "configuration" in saved["init_args"]:
        origin.append(f"configuration {saved['init_args']['configuration']}")
    return saved["network_weights"], ", ".join(origin)


def check_compatible(planned: dict, stock: dict, source: str, target: str) -> None:
    """nnU-Net's rule: every key of the ``planned`` state dict but the seg layers' in ``stock`` with the same shape.
    One error naming the missing keys and the shape mismatches (the first few of each, with counts)."""
    required = [key for key in planned if transferred(key)]
    missing = [key for key in required if key not in stock]
    mismatched = [f"{key}: checkpoint {tuple(stock[key].shape)}, network {tuple(planned[key].shape)}"
                  for key in required if key in stock and stock[key].shape != planned[key].shape]
    if not missing and not mismatched:
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} of its {len(required)} keys are missing from the checkpoint "
                        f"({', '.join(missing[:SHOWN_KEYS])}{', ...' if len(missing) > SHOWN_KEYS else ''})")
    if mismatched:
        problems.append(f"{len(mismatched)} keys have another shape ({'; '.join(mismatched[:SHOWN_KEYS])}"
                        f"{'; ...' if len(mismatched) > SHOWN_KEYS else ''})")
    raise NnunetRLError(f"{source} does not fit {target}: {' and '.join(problems)}. Convert a checkpoint trained "
                        f"with the same plans and configuration")


def load_stock_weights(network: nn.Module, stock: dict, stock_name: Callable[[str], str | None], source: str,
                       target: str) -> list[str]:
    """Load into ``network`` the ``stock`` state dict under nnU-Net's rules (:func:`check_compatible`; the seg layers
    keep their own weights), entry ``key`` from ``stock[stock_name(key)]``; the entries whose ``stock_name`` is None
    keep their weights. Returns the entries not taken from ``stock``."""
    state = network.state_dict()
    names = {key: stock_name(key) for key in state}
    from_stock = {key: name for key, name in names.items() if name is not None and transferred(name)}
    check_compatible({name: state[key] for key, name in from_stock.items()}, stock, source, target)
    state.update({key: stock[name] for key, name in from_stock.items()})
    network.load_state_dict(state)
    return [key for key in state if key not in from_stock]


def per_branch_stock_weights(network: nn.Module, stock: dict, source: str) -> dict:
    """The ``stock`` state dict once under each branch's prefix of a dual-branch ``network``, the weight of the input
    convolution (the architecture's ``keys_to_in_proj``, under each of its names in the state dict) cut to the input
    channels of the branch: stock's input convolution sees every channel of the dataset, a branch its own."""
    weights = {}
    input_channels = len(network.primary_channels) + len(network.auxiliary_channels)
    for direction in ("primary", "auxiliary"):
        branch, channels = getattr(network, f"{direction}_branch"), getattr(network, f"{direction}_channels")
        in_proj = branch.get_submodule(branch.keys_to_in_proj[0]).weight
        names = {key for key, value in branch.state_dict().items() if value.data_ptr() == in_proj.data_ptr()}
        for key, value in stock.items():
            if key in names and value.shape[1] != input_channels:
                raise NnunetRLError(f"{source}: its input convolution {key} sees {value.shape[1]} channels, the "
                                    f"dataset has {input_channels}; convert a checkpoint trained on this dataset's "
                                    f"channels (same plans and configuration)")
            weights[f"{direction}_branch.{key}"] = value[:, channels] if key in names else value
    return weights


def with_stock_weights(network: nn.Module, stock: dict, source: str, target: str) -> list[str]:
    """``network`` with the ``stock`` weights in its planned part (:func:`load_stock_weights`): for a per-voxel agents'
    network (``planned_network``, ``warm_start_from_planned``) the planned network's entries, then the agents
    warm-started from it; for a dual-branch network each branch's entries (:func:`per_branch_stock_weights`); for a
    network with pixel attention every entry but the gates'. Returns the entries not taken from ``stock``."""
    from nnunet_rl.dual_branch import DualBranchUNet
    from nnunet_rl.pam import stock_name as gated_stock_name
    from nnunet_rl.planned_network import AroundPlannedNetwork
    if isinstance(network, DualBranchUNet):
        branches = ("primary_branch.", "auxiliary_branch.")
        return load_stock_weights(network, per_branch_stock_weights(network, stock, source),
                                  lambda key: key if key.startswith(branches) else None, source, target)
    if not isinstance(network, AroundPlannedNetwork):
        return load_stock_weights(network, stock, gated_stock_name, source, target)
    prefix = next(name for name, module in network.named_modules() if module is network.planned_network) + "."
    fresh = load_stock_weights(network, stock, lambda key: key.removeprefix(prefix) if key.startswith(prefix)
                               else None, source, target)
    network.warm_start_from_planned()
    return fresh


def build_network(dataset: str, configuration: str, trainer_name: str, plans: str) -> tuple[nn.Module, str]:
    """TRAINER's network for the plans, as ``nnUNetv2_predict`` builds it (the trainer found by name as nnU-Net finds
    it, its ``build_network_architecture`` on nnU-Net's plans and dataset.json from ``nnUNet_preprocessed``), with
    deep supervision on as ``nnUNetv2_train`` builds it; and a description of it for messages."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    (preprocessed,) = require_nnunet_folders("nnUNet_preprocessed")
    name = nnunet_dataset_name(dataset)
    plans_file, dataset_json_file = preprocessed / name / f"{plans}.json", preprocessed / name / "dataset.json"
    for file in (plans_file, dataset_json_file):
        if not file.is_file():
            raise NnunetRLError(f"{file} does not exist: plan and preprocess the dataset first "
                                f"(nnunet-rl plan {dataset} -c {configuration} -p {plans})")
    plans_manager = PlansManager(json.loads(plans_file.read_text()))
    if configuration not in plans_manager.available_configurations:
        raise NnunetRLError(f"{plans_file} has no configuration {configuration!r} (it has "
                            f"{', '.join(plans_manager.available_configurations)})")
    configuration_manager = plans_manager.get_configuration(configuration)
    dataset_json = json.loads(dataset_json_file.read_text())
    trainer_class = find_trainer(trainer_name)
    network = trainer_class.build_network_architecture(
        plans_manager, configuration_manager, determine_num_input_channels(plans_manager, configuration_manager,
                                                                           dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=True)
    return network, f"{trainer_name}'s planned network ({name}, {plans}, {configuration})"


def find_trainer(trainer_name: str) -> type:
    """The trainer class of that name: ours directly, any other by nnU-Net's search (``nnUNet_extTrainer`` included);
    one of the per-voxel agents' trainers, of those with pixel attention, or paired RL-U2Net."""
    from nnunet_rl import trainers
    from nnunet_rl.trainers.pam import nnUNetTrainerPAM
    from nnunet_rl.trainers.rl_u2net import nnUNetTrainerRLU2Net
    from nnunet_rl.trainers.rl_u2net_unpaired import nnUNetTrainerRLU2Net_unpaired
    from nnunet_rl.trainers.voxel_agents import VoxelAgentsTrainer
    trainer_class = getattr(trainers, trainer_name, None)
    if trainer_class is None:
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
        try:
            trainer_class = recursive_find_trainer_class_by_name(trainer_name)
        except RuntimeError as error:
            raise NnunetRLError(f"no trainer {trainer_name!r}: {error}") from error
    if issubclass(trainer_class, nnUNetTrainerRLU2Net_unpaired):
        raise NnunetRLError(f"{trainer_name}'s branches train on two datasets, one modality each: a stock checkpoint "
                            f"of one dataset has no weights for the other branch's modality")
    if not issubclass(trainer_class, (VoxelAgentsTrainer, nnUNetTrainerPAM, nnUNetTrainerRLU2Net)):
        raise NnunetRLError(f"{trainer_name}'s network does not extend the planned one; pretrained-weights converts "
                            f"for nnUNetTrainerPixelRL, nnUNetTrainerMRLSeg, nnUNetTrainerPAM, nnUNetTrainerAWSnet, "
                            f"nnUNetTrainerRLU2Net and their variants (nnU-Net's own trainers and "
                            f"nnUNetTrainerRLDeepSup take a stock checkpoint as -pretrained_weights unchanged)")
    return trainer_class


def convert_stock_checkpoint(dataset: int | str, configuration: str, trainer_name: str, checkpoint: Path | str,
                             output: Path | str, plans: str = "nnUNetPlans") -> tuple[Path, list[str]]:
    """Write ``output`` = ``{"network_weights": ...}`` of TRAINER's network with the stock ``checkpoint``'s weights
    in its planned part (:func:`with_stock_weights`), for ``nnUNetv2_train ... -tr TRAINER -pretrained_weights
    output``. Returns ``output`` and the entries not taken from the checkpoint."""
    network, target = build_network(dataset, configuration, trainer_name, plans)
    checkpoint = Path(checkpoint)
    stock, origin = read_stock_weights(checkpoint)
    source = f"{checkpoint}" + (f" ({origin})" if origin else "")
    fresh = with_stock_weights(network, stock, source, target)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"network_weights": network.state_dict()}, output)
    return output, fresh


def modules_of(keys: list[str]) -> list[str]:
    """The modules holding the state-dict entries ``keys`` (each entry's name without its last part), in order."""
    return list(dict.fromkeys(key.rpartition(".")[0] for key in keys))
