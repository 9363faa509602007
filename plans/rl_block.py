"""The ``rl`` block that ``nnunet-rl plan`` writes into each configuration of an nnU-Net plans file.

Layout (version 1)::

    "rl": {
        "version": 1,
        "dataset": {                          # derived from the dataset, never a paper default
            "primary_channels": ["CT"],       # channel 0 by default
            "auxiliary_channels": ["MRI"],    # all other channels
            "primary_indices": [0],           # the same split as input-channel indices
            "auxiliary_indices": [1],
            "label_fractions": {"LV": 0.04, ...}   # mean voxel fraction per foreground label
        },
        "<component>": {...}                  # one section per RL component, paper defaults
    }

Each section is read as a frozen dataclass (:class:`DatasetFacts`, :data:`COMPONENT_SETTINGS`) that refuses keys it
does not know. Trainers read the block once; when a plans file has none (stock ``nnUNetPlans``), they derive the same
block on the fly, so stock plans work unchanged and a planned block only pins the values.
"""
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import numpy as np
from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

from nnunet_rl.errors import NnunetRLError

RL_BLOCK_KEY = "rl"
RL_BLOCK_VERSION = 1
MAX_CASES_FOR_LABEL_FRACTIONS = 50  # enough for a stable mean; keeps planning fast on large datasets



@dataclass(frozen=True)
class RLU2NetSettings:
    """The ``rl_u2net`` section: RL-U2Net (J. Qu and J. Zhao, "RL-U2Net: A Dual-Branch UNet with Reinforcement
    Learning-Assisted Multimodal Feature Fusion for Accurate 3D Whole-Heart Segmentation", preprint, no DOI). Choices
    where the paper is silent are ours and explained in docs/rl_u2net.md."""
    NETWORK_FIELDS: ClassVar[tuple[str, ...]] = ("aligned_stages", "fusion_directions", "window_size", "k_sel",
                                                  "temperature", "fusion_weight", "use_cma", "min_greedy_probability")

    aligned_stages: list[int] | None = None  # encoder stages followed by RL-XAlign; None: the deepest 4 at ≤ 1/4
                                             # resolution
    # both branches take the other in (Fig. 9); one of them: one way
    fusion_directions: list[str] = field(default_factory=lambda: ["primary", "auxiliary"])
    window_size: int = 4                     # CMA window w (eqs. 1-5); ours
    k_sel: int = 2                           # rotations sampled per forward and averaged (PoseAlign); ours
    temperature: float = 0.1                 # τ of π = softmax(θ/τ); ours
    fusion_weight: float = 0.3               # λ of eq. 7, best in the paper's sweep (Fig. 9)
    use_cma: bool = True
    min_greedy_probability: float = 0.5      # ours: after the RL phase and at inference the most probable rotation
                                             # is applied only where π on it is at least this, else the identity
    policy_lr: float = 1e-3                  # PPO (eqs. 10-13, Algorithm 1); ours: the paper's 5e-5 barely moves θ
                                             # in a default run's RL phase (docs/rl_u2net.md); the rest of this
                                             # group: the paper's settings
    value_lr: float = 2e-4
    clip: float = 0.2                        # ε of eq. 11; ours (PPO's usual value)
    gamma: float = 0.0                       # γ of eqs. 10, 13; ours: each sample is a one-step episode (its s' is
                                             # not where the next action is taken), so nothing is bootstrapped
    rollout_samples: int = 16                # N samples per PPO round
    ppo_epochs: int = 10                     # K mini-epochs
    minibatch: int = 64                      # M
    rl_fraction: float = 0.2                 # RL in the first 100 of 500 epochs; θ frozen after
    seed: int = 0                            # rotation sampling, PPO mini-batches, the unpaired reference patches
    agwd: bool = True                        # AGWD (eqs. 18-19)
    agwd_gamma: float = 1.0                  # γ, δ of eq. 18; ours
    agwd_delta: float = 0.0
    alignment_weight: float = 0.1            # λ₁ of eq. 20; ours
    infonce_weight: float = 1.0              # α, β of eq. 17; ours
    cosine_weight: float = 1.0
    infonce_temperature: float = 0.1
    reward_similarity_weight: float = 1.0    # weight of S_similarity in the PPO reward (eq. 9: 1); ours to name, so
                                             # that nnUNetTrainerRLU2Net_unpaired can drop it (different patients)
    unpaired: dict | None = None             # ours: the two datasets of nnUNetTrainerRLU2Net_unpaired (MM-WHS as
                                             # distributed), written by `nnunet-rl plan-unpaired`; None: paired

    def network_kwargs(self) -> dict:
        """The settings that shape :class:`~nnunet_rl.dual_branch.DualBranchUNet`, as its keyword arguments."""
        return {name: getattr(self, name) for name in self.NETWORK_FIELDS}


@dataclass(frozen=True)
class DeepSupervisionSettings:
    """The ``rl_deep_supervision`` section: AWSnet's DAS (Wang et al., see docs/rl_deep_supervision.md)."""
    candidates: int = 10                     # K weightings sampled per round
    lr: float = 0.05                         # Adam on the controllers' θ; ours (the paper's 1e-3 moves θ by at most
                                             # 1e-3 a round: π stays near uniform; see docs/rl_deep_supervision.md)
    init_std: float = 0.001                  # θ ~ N(0, 0.001)
    baseline_gamma: float = 1.0              # moving baseline B_t; ours: the round's mean reward (the paper's 0.99
                                             # lags a rising Dice by more than the candidates' spread)
    warmup_fraction: float = 0.75            # fixed nnU-Net weights first: 150 of 200 epochs in the paper (50
                                             # rounds); 750 of nnU-Net's 1000 (250 rounds)
    rl_steps_per_epoch: int = 1              # look-ahead rounds per RL epoch (the paper: one round per epoch)
    trial_steps: int = 10                    # _shortHorizon: training steps per candidate, on common batches
    trial_reward_batches: int = 5            # _shortHorizon: reward batches scoring each candidate
    seed: int = 0                            # controller initialisation and sampling


@dataclass(frozen=True)
class PixelRLSettings:
    """The ``pixel_rl`` section: PixelDRL-MG (Liu et al., see docs/pixel_rl.md)."""
    t_max: int = 10                          # steps per episode (the paper's setting, Fig. 7)
    gamma: float = 0.95                      # γ of eq. 8
    backbone_fraction: float = 0.5           # ours: the first half of the epochs train the planned network with
                                             # nnU-Net's loss only, then the heads join (the paper trains end to end)
    rl_gradient_to_backbone: bool = True     # eq. 16: the segmentation network also receives the A2C gradient
    heads_optimizer: str = "adam"            # the paper's Adam for the heads and ω ("sgd": nnU-Net's SGD, as the rest)
    heads_lr: float = 1e-3                   # the paper's Adam lr, decayed by nnU-Net's poly schedule like the rest
    use_sam: bool = True                     # SAM, eq. 1 (False: _noSAM, Table 3)
    # DC: one 3^d convolution per entry (all 1: _noDC, Table 3); ours
    head_dilations: list[int] = field(default_factory=lambda: [1, 2, 4])
    head_channels: int = 16                  # width of the policy and value heads; ours
    omega_kernel_size: int = 3               # ω of eq. 8, a 3^d neighbourhood N(i); ours
    proposal_threshold: float = 0.0          # ours: f(0) adds the voxels whose background probability is below this
                                             # to the argmax's foreground (0: f(0) is the backbone's argmax)
    initial_episode_keep_probability: float = 0.6  # ours: an untrained policy keeps a label through a whole sampled
                                                   # episode with this probability (0.95 per step at t_max = 10)
    seed: int = 0                            # action sampling


@dataclass(frozen=True)
class MRLSegSettings:
    """The ``mrl_seg`` section: MRL-Seg (Yang et al., see docs/mrl_seg.md)."""
    steps: int = 4                           # actions per episode ("4 actions were performed on each slice", §IV.B)
    gamma: float = 0.95                      # γ of eqs. 6, 11-12 (§IV.B)
    alpha: float = -0.5                      # α ∈ (−1, 0) of eq. 3; ours: the middle of the range
    beta: float = 0.25                       # β ∈ (0.2, 0.3) of eq. 3; ours: the middle, optimum at N_F/N_B = 0.5
    use_prior: bool = True                   # eq. 3's foreground/background prior, FB (False: _noFB, Table V)
    use_difficulty: bool = True              # ADP, eqs. 10-11 (False: _noADP, Table V)
    pretrain: bool = True                    # pre-trained Segmentation-Net initialising the Reinforcement-Net
                                             # (False: _noPretrain, Table V)
    segmentation_fraction: float = 0.5       # ours: share of the epochs pre-training the Segmentation-Net with
                                             # nnU-Net's loss before the RL phase
    encoder_stages: int = 3                  # the Reinforcement-Net's "three convolution blocks" (Fig. 3), copies of
                                             # the planned encoder's first stages
    head_layers: int = 3                     # "three convolution compositions" per head (§III.A)
    heads_optimizer: str = "adam"            # the Reinforcement-Net and w on Adam, the paper's optimiser ("sgd":
                                             # nnU-Net's SGD, as the Segmentation-Net)
    heads_lr: float = 1e-3                   # ours: the paper gives Adam's lr 0.01 for the Segmentation-Net only;
                                             # decayed by nnU-Net's poly schedule like the rest
    head_channels: int = 16                  # width of the projected features and of the heads; ours
    omega_kernel_size: int = 3               # w of eq. 11, N(i) and ADP's window F_i (eq. 10); ours
    initial_episode_retain_probability: float = 0.9  # ours: an untrained policy retains a voxel through a sampled
                                                     # episode with this probability (and masks nothing greedily)
    seed: int = 0                            # action sampling


# One section per RL component, each a frozen dataclass whose defaults are the paper's (or ours, where it is
# silent); `nnunet-rl plan` writes them all. A component that lands adds its class here.
COMPONENT_SETTINGS: dict[str, type] = {"rl_u2net": RLU2NetSettings, "rl_deep_supervision": DeepSupervisionSettings,
                                       "pixel_rl": PixelRLSettings, "mrl_seg": MRLSegSettings}


def paper_defaults(component: str) -> dict:
    """A component's section as the plans hold it (JSON): every hyperparameter at its default."""
    return asdict(COMPONENT_SETTINGS[component]())


@dataclass(frozen=True)
class DatasetFacts:
    """The ``dataset`` section: what planning derived from the data (:func:`derive_rl_block`), never a paper default.

    The channel split by name and by input index (the indices are what a network needs: ``build_network_architecture``
    sees the plans but not dataset.json; None in blocks planned before they were added: networks then take channel 0
    and the rest), and the mean voxel fraction of each foreground label (None where planning read no reference
    segmentations; MRL-Seg's eq. 3 needs it).
    """
    primary_channels: list[str]
    auxiliary_channels: list[str]
    primary_indices: list[int] | None = None
    auxiliary_indices: list[int] | None = None
    label_fractions: dict[str, float] | None = None

    @classmethod
    def from_block(cls, block: dict) -> "DatasetFacts":
        """The block's section; one with unknown or missing keys (an edited or foreign block) is refused."""
        given = block.get("dataset", {})
        known = {entry.name for entry in fields(cls)}
        required = {entry.name for entry in fields(cls)
                    if entry.default is MISSING and entry.default_factory is MISSING}
        if set(given) - known or required - set(given):
            raise NnunetRLError(f"the dataset section of the plans' rl block has the keys {sorted(given)}; it needs "
                                f"{sorted(required)} and may have {sorted(known - required)}: rerun `nnunet-rl plan`")
        return cls(**given)


def channel_split(channel_names: dict, auxiliary: list[str] | None = None) -> dict:
    """Primary/auxiliary channel groups by name and by input index; default: channel 0 primary, the rest auxiliary.

    The indices are what a network needs: ``build_network_architecture`` sees the plans but not dataset.json.
    """
    names = [channel_names[k] for k in sorted(channel_names, key=int)]
    if auxiliary is None:
        auxiliary = names[1:]
    unknown = sorted(set(auxiliary) - set(names))
    if unknown:
        raise NnunetRLError(f"auxiliary channels {unknown} are not among the dataset's channels {names}")
    return {"primary_channels": [n for n in names if n not in auxiliary], "auxiliary_channels": list(auxiliary),
            "primary_indices": [i for i, n in enumerate(names) if n not in auxiliary],
            "auxiliary_indices": [i for i, n in enumerate(names) if n in auxiliary]}


def label_fractions(gt_folder: Path, dataset_json: dict) -> dict[str, float] | None:
    """Mean voxel fraction of each foreground label over (up to 50) reference segmentations; None without data."""
    files = sorted(Path(gt_folder).glob(f"*{dataset_json['file_ending']}"))[:MAX_CASES_FOR_LABEL_FRACTIONS]
    labels = {name: value for name, value in dataset_json["labels"].items()
              if isinstance(value, int) and name not in ("background", "ignore")}
    if not files or not labels:
        return None
    reader = determine_reader_writer_from_dataset_json(dataset_json, str(files[0]))()
    fractions = np.zeros(max(labels.values()) + 1)
    for file in files:
        segmentation, _ = reader.read_seg(str(file))
        counts = np.bincount(segmentation.astype(np.int64).ravel(), minlength=fractions.size)[:fractions.size]
        fractions += counts / segmentation.size
    return {name: float(fractions[value] / len(files)) for name, value in labels.items()}


def derive_rl_block(dataset_json: dict, gt_folder: Path | None) -> dict:
    """The block ``nnunet-rl plan`` writes, and the fallback trainers use when the plans have none."""
    return {
        "version": RL_BLOCK_VERSION,
        "dataset": {
            **channel_split(dataset_json["channel_names"]),
            "label_fractions": label_fractions(gt_folder, dataset_json) if gt_folder is not None else None,
        },
        **{component: paper_defaults(component) for component in COMPONENT_SETTINGS},
    }


def rl_section(block: dict, component: str):
    """A component's settings (its :data:`COMPONENT_SETTINGS` class): the defaults, overridden by the values in the
    block.

    A key the component does not know is refused, so a typo in an edited plans file cannot pass silently.
    """
    settings = COMPONENT_SETTINGS[component]
    given = block.get(component, {})
    known = {entry.name for entry in fields(settings)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise NnunetRLError(f"unknown {component} hyperparameters {unknown} in the plans' rl block; "
                            f"known: {sorted(known)}")
    return settings(**given)


def read_rl_block(configuration_manager: ConfigurationManager, dataset_json: dict,
                  gt_folder: Path | None) -> dict:
    """The configuration's ``rl`` block, or the derived one when the plans have none."""
    block = configuration_manager.configuration.get(RL_BLOCK_KEY)
    if block is None:
        return derive_rl_block(dataset_json, gt_folder)
    if block.get("version") != RL_BLOCK_VERSION:
        raise NnunetRLError(f"the plans' rl block has version {block.get('version')}, this nnunet_rl reads "
                            f"version {RL_BLOCK_VERSION}: rerun `nnunet-rl plan`")
    _check_channel_indices(DatasetFacts.from_block(block), dataset_json)
    return block


def _check_channel_indices(facts: DatasetFacts, dataset_json: dict) -> None:
    """The channel names and indices of an (edited) block must name the same channels."""
    if facts.primary_indices is None:
        return
    expected = channel_split(dataset_json["channel_names"], facts.auxiliary_channels)
    if [facts.primary_indices, facts.auxiliary_indices] != \
            [expected["primary_indices"], expected["auxiliary_indices"]]:
        raise NnunetRLError(f"the plans' rl block names auxiliary channels {facts.auxiliary_channels} but lists "
                            f"indices {facts.auxiliary_indices}; for these names they are "
                            f"{expected['auxiliary_indices']} (primary {expected['primary_indices']})")
