"""``nnUNetTrainerRLU2Net``: RL-U2Net on nnU-Net's planned topology, data, augmentation and loop.

J. Qu and J. Zhao, "RL-U2Net: A Dual-Branch UNet with Reinforcement Learning-Assisted Multimodal Feature Fusion for
Accurate 3D Whole-Heart Segmentation" (preprint, no DOI).

The trainer only wires components into nnU-Net's hooks:

- ``build_network_architecture``: :class:`~nnunet_rl.dual_branch.DualBranchUNet` from the plans (also used by
  ``nnUNetv2_predict``, which then gets the branches' soft vote as logits, eqs. 14-16);
- ``_build_loss``: :class:`~nnunet_rl.dual_branch_loss.DualBranchLoss` (eq. 20, AGWD eqs. 18-19);
- ``get_training_transforms`` / ``train_step``: nnU-Net's pipeline without its mirroring, which ``train_step`` does
  itself so that PoseAlign turns each mirrored sample by the conjugated rotation (:mod:`nnunet_rl.mirroring`);
- ``train_step``: during the RL phase, PoseAlign rotations are sampled per module; on rollout iterations a
  no-grad forward with PoseAlign disabled gives the baseline state, nnU-Net's own training step gives the next
  state and the reward (Algorithm 1, lines 5-14), and a full buffer triggers the PPO update (lines 17-31);
- ``save_checkpoint``: the test-time mirror axes that commute with the greedy rotations, which ``nnUNetv2_predict``
  reads from the checkpoint;
- ``on_train_end``: ``rl_policy.json`` with every module's rotation probabilities and matrices;
- per epoch, nnU-Net's logger (checkpoint, ``progress.png``, W&B) gets each module's top probability and, on phantoms
  with a known MRI rotation (``make-dataset --rotate-aux fixed``), its probability on the rotation it needs.
"""
import math
from contextlib import contextmanager

import numpy as np
import torch
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import autocast, nn

from nnunet_rl.datasets.synthetic import needed_rotations
from nnunet_rl.dual_branch import DualBranchUNet
from nnunet_rl.dual_branch_loss import BranchTargets, DualBranchLoss, Measurement
from nnunet_rl.errors import NnunetRLError
from nnunet_rl.mirroring import commuting_axes, draw_mirroring, mirror_batch
from nnunet_rl.plans.rl_block import RL_BLOCK_KEY, DatasetFacts
from nnunet_rl.ppo import PPOAgent, RolloutBuffer, Transition, rollout_iterations, state_vector
from nnunet_rl.trainers.base import RLTrainerBase
from nnunet_rl.u2net_losses import AGWD

COMPONENT = "rl_u2net"
POLICY_FILE = "rl_policy.json"
SINGLE_CHANNEL_TRAINERS = ("nnUNetTrainer", "nnUNetTrainerPAM", "nnUNetTrainerRLDeepSup")
PPO_STATISTICS = ("value_loss", "policy_loss", "entropy", "approx_kl", "clip_fraction")  # per PPO update, as SB3


def channel_indices(block: dict, num_input_channels: int) -> tuple[list[int], list[int]]:
    """Primary and auxiliary input channels from the rl block; channel 0 and the rest when the plans have none."""
    facts = DatasetFacts.from_block(block) if block else None
    if facts is None or facts.primary_indices is None:
        return [0], list(range(1, num_input_channels))
    return facts.primary_indices, facts.auxiliary_indices


@contextmanager
def trainable(parameter: nn.Parameter):
    """θ takes gradients only inside the PPO update; the segmentation loss and DDP never see it."""
    parameter.requires_grad_(True)
    try:
        yield
    finally:
        parameter.requires_grad_(False)


class nnUNetTrainerRLU2Net(RLTrainerBase):
    """Dual-branch U-Net with RL-XAlign (CMA + PoseAlign + PPO), AGWD and the alignment loss (Qu and Zhao)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        self.check_channels(dataset_json)
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_cascaded:
            raise NnunetRLError(f"{type(self).__name__} does not train cascade stages: nnU-Net's cascade "
                                f"({configuration}) adds the previous stage's segmentation to the input channels, "
                                f"which the two branches (one modality each) do not take; use 3d_fullres, 3d_lowres "
                                f"or 2d")

    def check_channels(self, dataset_json: dict) -> None:
        """Paired data: a primary and an auxiliary modality as channels of one dataset."""
        if len(dataset_json["channel_names"]) < 2:
            raise NnunetRLError(
                f"{type(self).__name__} needs paired multi-channel data (a primary and an auxiliary modality); this "
                f"dataset has the single channel {list(dataset_json['channel_names'].values())}. For single-channel "
                f"data use {', '.join(SINGLE_CHANNEL_TRAINERS)}; for two single-modality datasets (MM-WHS) "
                f"nnUNetTrainerRLU2Net_unpaired.")

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        block = configuration_manager.configuration.get(RL_BLOCK_KEY, {})
        hp = cls.hyperparameters_from(block, COMPONENT)
        primary, auxiliary = channel_indices(block, num_input_channels)
        return DualBranchUNet(num_input_channels, num_output_channels, configuration_manager.network_arch_class_name,
                              configuration_manager.network_arch_init_kwargs,
                              configuration_manager.network_arch_init_kwargs_req_import,
                              primary_channels=primary, auxiliary_channels=auxiliary,
                              deep_supervision=enable_deep_supervision,
                              **hp.network_kwargs())

    def _do_i_compile(self) -> bool:
        """Not compiled: the PoseAlign actions change per step and the training output is a dataclass."""
        return False

    def _build_loss(self) -> nn.Module:
        hp = self.rl_hyperparameters(COMPONENT)
        agwd = AGWD(gamma=hp.agwd_gamma, delta=hp.agwd_delta) if hp.agwd else None
        return DualBranchLoss(super()._build_loss(), agwd, alignment_weight=hp.alignment_weight,
                              infonce_weight=hp.infonce_weight, cosine_weight=hp.cosine_weight,
                              infonce_temperature=hp.infonce_temperature)

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        self.bare_network.set_deep_supervision(enabled)

    def initialize(self) -> None:
        super().initialize()
        hp = self.rl_hyperparameters(COMPONENT)
        modules = self.bare_network.xalign
        self.pose_generator = torch.Generator().manual_seed(hp.seed)  # rotations and mirroring flips
        self.rl_epochs = math.ceil(hp.rl_fraction * self.num_epochs)
        self.agents = {key: PPOAgent(module.pose, policy_lr=hp.policy_lr, value_lr=hp.value_lr, clip=hp.clip,
                                     gamma=hp.gamma, ppo_epochs=hp.ppo_epochs, minibatch=hp.minibatch, seed=hp.seed)
                       for key, module in modules.items()} if self.rl_epochs > 0 else {}
        self.buffers = {key: RolloutBuffer(capacity=hp.rollout_samples, k_sel=hp.k_sel) for key in self.agents}
        self.rollout_iterations = rollout_iterations(self.num_iterations_per_epoch, hp.rollout_samples)
        self.training_mirror_axes: tuple[int, ...] | None = None  # set with the training transforms
        self.register_telemetry("rl_u2net/agwd_w_dice", "rl_u2net/agwd_w_ce", "rl_u2net/alignment_loss")
        if modules:
            self.register_telemetry("rl_u2net/reward", *(f"rl_u2net/{name}" for name in PPO_STATISTICS),
                                    *(f"rl_u2net/{key}/top_probability" for key in modules))
        self.needed_rotations = needed_rotations(self.dataset_json)  # phantoms with a known MRI rotation only
        if modules and self.needed_rotations:
            self.register_telemetry(*(f"rl_u2net/{key}/needed_rotation_probability" for key in modules))
        self._epoch_records: dict[str, list[float]] = {}

    def get_training_transforms(self, patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                do_dummy_2d_data_aug, **kwargs):
        """nnU-Net's training pipeline without its ``MirrorTransform``: :meth:`train_step` mirrors along the same
        axes itself, where it knows each sample's flips and PoseAlign can conjugate the rotation accordingly."""
        self.training_mirror_axes = tuple(mirror_axes) if mirror_axes else None
        return super().get_training_transforms(patch_size, rotation_for_DA, deep_supervision_scales, None,
                                               do_dummy_2d_data_aug, **kwargs)

    def prediction_mirror_axes(self) -> tuple[int, ...] | None:
        """The training mirror axes whose flips commute with the rotation every module applies at inference:
        nnU-Net's test-time mirroring cannot tell the network which flip it applied, and along these axes it needs
        none."""
        applied = [int(module.pose.deterministic_action()) for module in self.bare_network.xalign.values()]
        return commuting_axes(self.training_mirror_axes, applied, len(self.configuration_manager.patch_size))

    def save_checkpoint(self, filename: str) -> None:
        self.inference_allowed_mirroring_axes = self.prediction_mirror_axes()  # what nnUNetv2_predict mirrors
        super().save_checkpoint(filename)

    def in_rl_phase(self) -> bool:
        return bool(self.agents) and self.current_epoch < self.rl_epochs

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._iteration = 0
        self._epoch_records = {}

    def _record(self, key: str, value: float) -> None:
        self._epoch_records.setdefault(key, []).append(value)

    def _disabled_pose_measurement(self, batch: dict) -> Measurement:
        """Baseline state (Algorithm 1, lines 6-9): a no-grad forward with every PoseAlign at the identity."""
        network = self.bare_network
        network.set_actions({key: torch.zeros(1, dtype=torch.long) for key in network.xalign})
        with torch.no_grad(), autocast(self.device.type, enabled=True) if self.device.type == "cuda" \
                else dummy_context():
            return self.loss.measure(self.network(batch["data"]), batch["target"])

    def _mirrored(self, batch: dict) -> dict:
        """The batch on the device, its samples mirrored as nnU-Net's MirrorTransform would; the network is told the
        flips (:mod:`nnunet_rl.mirroring`)."""
        data, target = self.batch_to_device(batch)
        if self.training_mirror_axes is None:
            return {"data": data, "target": target}
        mirroring = draw_mirroring(data.shape[0], self.training_mirror_axes, data.ndim - 2, self.pose_generator)
        self.bare_network.set_mirroring(mirroring)
        if isinstance(target, BranchTargets):
            target = target.map(lambda t: mirror_batch(t, mirroring))
        else:
            target = [mirror_batch(t, mirroring) for t in target] if isinstance(target, list) else \
                mirror_batch(target, mirroring)
        return {"data": mirror_batch(data, mirroring), "target": target}

    def train_step(self, batch: dict) -> dict:
        try:
            batch = self._mirrored(batch)
            result = self._rl_train_step(batch) if self.in_rl_phase() else super().train_step(batch)
        finally:
            self.bare_network.set_mirroring(None)
        self._iteration += 1
        if self.loss.agwd is not None:
            for kind in ("dice", "ce"):
                self._record(f"rl_u2net/agwd_w_{kind}", self.loss.agwd.last_weight.get(kind, math.nan))
        self._record("rl_u2net/alignment_loss", float(self.loss.last_alignment_loss))
        return result

    def _rl_train_step(self, batch: dict) -> dict:
        """nnU-Net's training step with sampled rotations; on rollout iterations also the PPO sample."""
        network = self.bare_network
        collect = self._iteration in self.rollout_iterations
        before = self._disabled_pose_measurement(batch) if collect else None
        actions = {key: module.pose.sample(self.pose_generator) for key, module in network.xalign.items()}
        network.set_actions(actions)
        self.loss.record_similarity = collect
        try:
            result = super().train_step(batch)
        finally:
            network.set_actions(None)
            self.loss.record_similarity = False
        if collect:
            self._store_rollout(before, self.loss.last_measurement(), actions)
        return result

    def _store_rollout(self, before: Measurement, after: Measurement, actions: dict) -> None:
        """One (s, a, r, s') per module (eqs. 8-9): s from the disabled forward, s' and r from the training step.
        Values are averaged over DDP ranks first: identical buffers, hence identical policies, on all ranks."""
        before, after = before.mean_across_ranks(), after.mean_across_ranks()
        progress, next_progress = self.current_epoch / self.num_epochs, (self.current_epoch + 1) / self.num_epochs
        similarity_weight = self.rl_hyperparameters(COMPONENT).reward_similarity_weight
        for key, buffer in self.buffers.items():
            branch = self.bare_network.sites[key].direction
            reward = after.dice[branch] + similarity_weight * after.similarity[key]  # eq. 9
            pose = self.bare_network.xalign[key].pose
            with torch.no_grad():
                log_prob = pose.log_prob(actions[key][None]).cpu()
            buffer.add(Transition(state=state_vector(before.dice[branch], before.similarity[key], progress),
                                  next_state=state_vector(after.dice[branch], after.similarity[key], next_progress),
                                  actions=actions[key], log_prob_old=log_prob[0], reward=torch.tensor(reward)))
            self._record("rl_u2net/reward", reward)
            if buffer.full:
                with trainable(pose.theta):
                    stats = self.agents[key].update(buffer)
                buffer.clear()
                for name in PPO_STATISTICS:
                    self._record(f"rl_u2net/{name}", stats[name])

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        super().on_train_epoch_end(train_outputs)
        for key, values in self._epoch_records.items():
            self.log_telemetry(key, float(np.nanmean(values)) if not np.all(np.isnan(values)) else math.nan)
        for key, module in self.bare_network.xalign.items():
            probabilities = module.pose.probabilities()
            self.log_telemetry(f"rl_u2net/{key}/top_probability", float(probabilities.max()))
            if self.needed_rotations:
                needed = self.needed_rotations[self.bare_network.sites[key].direction]
                self.log_telemetry(f"rl_u2net/{key}/needed_rotation_probability", float(probabilities[needed]))

    def rl_policy(self) -> dict:
        """Per module, the rotation probabilities and matrices as applied to the auxiliary features."""
        modules = {}
        for key, module in self.bare_network.xalign.items():
            probabilities = module.pose.probabilities().detach().cpu().numpy()
            order = np.argsort(-probabilities, kind="stable")
            site = self.bare_network.sites[key]
            modules[key] = {
                "receiving_branch": site.direction, "encoder_stage": site.stage,
                "greedy_index": int(module.pose.greedy_action()),
                "applied_index": int(module.pose.deterministic_action()),
                "rotations": [{"index": int(i), "probability": float(probabilities[i]),
                               "matrix": module.pose.rotations[i].cpu().int().tolist()} for i in order]}
        axes = self.prediction_mirror_axes()
        return {"convention": "matrices in the feature maps' array-axis order; the auxiliary feature at centred "
                              "index x moves to matrix @ x (nnunet_rl.rotations); greedy_index is the most probable "
                              "rotation; after the RL phase and at inference the network applies applied_index: "
                              "greedy_index where its probability reaches min_greedy_probability, else 0 (identity)",
                "test_time_mirror_axes": None if axes is None else list(axes),
                "modules": modules}

    def on_train_end(self) -> None:
        self.save_fold_json(POLICY_FILE, self.rl_policy())
        super().on_train_end()

    def rl_state_dict(self) -> dict:
        return {"agents": {key: agent.state_dict() for key, agent in self.agents.items()},
                "buffers": {key: buffer.state_dict() for key, buffer in self.buffers.items()},
                "agwd": self.loss.agwd.state_dict() if self.loss.agwd is not None else None,
                "pose_generator": self.pose_generator.get_state()}

    def load_rl_state_dict(self, state: dict) -> None:
        for key, agent in self.agents.items():
            agent.load_state_dict(state["agents"][key])
            self.buffers[key].load_state_dict(state["buffers"][key])
        if self.loss.agwd is not None:
            self.loss.agwd.load_state_dict(state["agwd"])
        self.pose_generator.set_state(state["pose_generator"])
