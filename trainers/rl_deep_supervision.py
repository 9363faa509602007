"""``nnUNetTrainerRLDeepSup``: nnU-Net's deep-supervision weights learned per dataset by AWSnet's DAS.

Wang et al., "AWSnet: An auto-weighted supervision attention network for myocardial scar and edema segmentation in
multi-sequence cardiac magnetic resonance images", Medical Image Analysis 77 (2022) 102362,
doi:10.1016/j.media.2022.102362, the DAS section and Fig. 4. The loss stays nnU-Net's
``DeepSupervisionWrapper(DC_and_CE)``; only its ``weight_factors`` change, to α = softmax(β) over the outputs nnU-Net
supervises (its zero-weight lowest output stays at its stock value). After a warm-up with nnU-Net's fixed weights,
each RL round samples K weightings from the controllers, rewards each with a cubed Dice on held-out *reward cases*,
updates the controllers by REINFORCE against a baseline and keeps the best weighting
(:mod:`nnunet_rl.rl_deep_supervision`).

Reward cases are carved out of the fold's training cases (:class:`HeldOutRewardCases`): the fold's validation cases,
which nnU-Net and ``nnunet-rl compare`` report as unseen, never reach the RL. The trainers differ in how a
candidate's Dice is found:

- ``nnUNetTrainerRLDeepSup_faithful``: the paper's bilevel scheme. Every RL epoch trains K copies of the network for
  one epoch each from the same start, scores each on the same reward batches and continues from the best copy.
- ``nnUNetTrainerRLDeepSup_shortHorizon``: the bilevel scheme on ``trial_steps`` steps, all candidates on the same
  training batches. Measured not to tell a useless output from a useful one (docs/rl_deep_supervision.md).
- ``nnUNetTrainerRLDeepSup`` (default): a first-order look-ahead, a cheap proxy. Per RL round, the gradients g_l of
  each output's loss on a training batch and the gradient h of the soft Dice on a reward batch give
  D(α) ≈ D − c Σ_l α_l ⟨g_l, h⟩ (c > 0); all K candidates are scored from L + 1 backward passes. The proxy ranks
  candidates by a quantity linear in α; docs/rl_deep_supervision.md says what it does and does not estimate.
- ``_randomSearch`` variants: the same candidates and keep-the-best rule with frozen controllers, the control that
  shows what REINFORCE adds.
- ``nnUNetTrainerAWSnet``: the paper's whole network, PAM on every skip (:mod:`nnunet_rl.pam`) and DAS.
"""
import copy
import math

import numpy as np
import torch
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

from nnunet_rl.rl_deep_supervision import (DASControllers, DeepSupervisionWeights, MovingBaseline, cubed_reward,
                                           num_controlled)
from nnunet_rl.distributed import mean_across_ranks
from nnunet_rl.errors import NnunetRLError
from nnunet_rl.trainers.base import RLTrainerBase
from nnunet_rl.trainers.pam import nnUNetTrainerPAM
from nnunet_rl.trainers.reward_cases import HeldOutRewardCases

COMPONENT = "rl_deep_supervision"
WEIGHTS_FILE = "rl_deep_supervision.json"


def soft_foreground_dice(loss: torch.nn.Module, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """nnU-Net's soft Dice of ``loss`` (``DC_and_CE_loss`` or, for regions, ``DC_and_BCE_loss``), differentiable.

    Voxels of the ignore label are masked as the loss masks them: label maps have the ignore label replaced by 0 and
    left out by the mask; region targets carry the ignore mask as their last channel.
    """
    if isinstance(loss, DC_and_BCE_loss):
        mask = None
        if loss.use_ignore_label:
            mask = ~target[:, -1:].bool()
            target = target[:, :-1]
    elif loss.ignore_label is not None:
        mask = target != loss.ignore_label
        target = torch.where(mask, target, 0)
    else:
        mask = None
    return -loss.dc(output, target, loss_mask=mask)


def hard_foreground_dice(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> float:
    """Mean foreground Dice from per-class counts; a class absent from reference and prediction scores 1 (nothing
    to find, nothing found), so a reward is never NaN, also when every class is empty."""
    denominator = 2 * tp + fp + fn
    per_class = torch.where(denominator > 0, 2 * tp / denominator.clamp(min=1), torch.ones_like(denominator))
    return float(per_class.mean())


class RLDeepSupervisionTrainer(HeldOutRewardCases, RLTrainerBase):
    """What the DAS trainers share: weights, controllers, baseline, reward cases, telemetry, state; subclasses score
    candidates. ``controllers_learn = False`` freezes the controllers (random search over the same candidates)."""
    controllers_learn = True

    def initialize(self) -> None:
        super().initialize()
        if not isinstance(self.loss, DeepSupervisionWrapper):
            raise NnunetRLError(f"{type(self).__name__} learns deep-supervision weights, but this configuration "
                                f"trains without deep supervision")
        hp = self.rl_hyperparameters(COMPONENT)
        num_outputs = len(self.loss.weight_factors)
        self.zero_output_weight = self.loss.weight_factors[-1] if num_outputs > 1 else None  # 0, or 1e-6 under DDP
        self.das_weights = DeepSupervisionWeights.stock(num_outputs)
        self.controllers = DASControllers(num_controlled(num_outputs), lr=hp.lr, init_std=hp.init_std, seed=hp.seed)
        self.baseline = MovingBaseline(hp.baseline_gamma)
        self.candidates = hp.candidates
        self.rl_start_epoch = math.floor(hp.warmup_fraction * self.num_epochs)
        self.rl_steps_per_epoch = hp.rl_steps_per_epoch
        self.register_telemetry(*(f"rl_deep_supervision/alpha_{i}" for i in range(num_outputs)),
                                *(f"rl_deep_supervision/entropy_{i}" for i in range(self.das_weights.num_controlled)),
                                "rl_deep_supervision/reward")
        self._apply_weights()

    def _apply_weights(self) -> None:
        """Write α into nnU-Net's DeepSupervisionWrapper, keeping the stock weight of its unsupervised output."""
        alpha = self.das_weights.alpha()
        if self.zero_output_weight is None:
            self.loss.weight_factors = tuple(alpha)
        else:
            self.loss.weight_factors = (*(alpha * (1 - self.zero_output_weight)), self.zero_output_weight)

    def in_rl_phase(self) -> bool:
        return self.current_epoch >= self.rl_start_epoch

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._iteration = 0
        self._rewards: list[float] = []

    def rl_round(self, score) -> None:
        """One DAS round: K candidates, scored by ``score(betas) -> dice per candidate``; REINFORCE; keep the best."""
        actions, betas = self.das_weights.candidates(self.controllers, self.candidates)
        rewards = [cubed_reward(float(d)) for d in score(betas)]
        if self.controllers_learn:
            self.controllers.update(actions, rewards, self.baseline)
        self.das_weights.keep(betas[int(np.argmax(rewards))])
        self._apply_weights()
        self._rewards.extend(rewards)

    def learned_weights(self) -> dict:
        return {"order": "nnU-Net's deep-supervision outputs, full resolution first",
                "alpha": [float(w) for w in self.loss.weight_factors],
                "beta": [float(b) for b in self.das_weights.beta],
                "stock_alpha": [float(w) for w in DeepSupervisionWeights.stock(len(self.loss.weight_factors)).alpha()],
                "controller_probabilities": self.controllers.probabilities().tolist(),
                "actions": "delta beta -0.15, 0, +0.15"}

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        super().on_train_epoch_end(train_outputs)
        for i, weight in enumerate(self.loss.weight_factors):
            self.log_telemetry(f"rl_deep_supervision/alpha_{i}", weight)
        for i, entropy in enumerate(self.controllers.entropies().tolist()):
            self.log_telemetry(f"rl_deep_supervision/entropy_{i}", entropy)
        if self._rewards:
            self.log_telemetry("rl_deep_supervision/reward", float(np.mean(self._rewards)))

    def on_train_end(self) -> None:
        self.save_fold_json(WEIGHTS_FILE, self.learned_weights())
        super().on_train_end()

    def rl_state_dict(self) -> dict:
        return {"controllers": self.controllers.state_dict(), "weights": self.das_weights.state_dict(),
                "baseline": self.baseline.state_dict()}

    def load_rl_state_dict(self, state: dict) -> None:
        self.controllers.load_state_dict(state["controllers"])
        self.das_weights.load_state_dict(state["weights"])
        self.baseline.load_state_dict(state["baseline"])
        self._apply_weights()


class nnUNetTrainerRLDeepSup(RLDeepSupervisionTrainer):
    """DAS with candidates scored by a first-order look-ahead: ``rl_steps_per_epoch`` rounds per RL epoch."""

    def train_step(self, batch: dict) -> dict:
        steps_every = max(1, self.num_iterations_per_epoch // self.rl_steps_per_epoch)
        if self.in_rl_phase() and self._iteration % steps_every == 0:
            self.rl_round(lambda betas: self.look_ahead_dice(batch, next(self.dataloader_reward), betas))
        self._iteration += 1
        return super().train_step(batch)

    def look_ahead_dice(self, batch: dict, reward_batch: dict, betas: np.ndarray) -> np.ndarray:
        """First-order soft Dice on a reward batch after one SGD step with each candidate weighting (float32).

        D(α) ≈ D − η·Σ_l α_l ⟨g_l, h⟩, g_l = ∇ L_l(train batch), h = ∇ softDice(reward batch, network in eval mode
        as nnU-Net validates), on the network without its DDP wrapper; ⟨g_l, h⟩ and D are averaged over ranks so every
        rank scores alike. The candidates' ranking does not depend on the step: a horizon of S steps would multiply
        η by S and only push the scores into the clip to [0, 1], where candidates tie.
        """
        network = self.bare_network
        parameters = [p for p in network.parameters() if p.requires_grad]
        reward_data, reward_target = self.batch_to_device(reward_batch)
        network.eval()
        dice = soft_foreground_dice(self.loss.loss, network(reward_data)[0], reward_target[0])
        dice_gradient = torch.autograd.grad(dice, parameters, allow_unused=True)  # frees the reward graph
        network.train()
        data, target = self.batch_to_device(batch)
        outputs = network(data)
        controlled = self.das_weights.num_controlled
        alignment = torch.stack([  # one g_l at a time, reduced to <g_l, h> at once: one extra parameter copy
            sum((g * h).sum() for g, h in zip(
                torch.autograd.grad(self.loss.loss(outputs[i], target[i]), parameters,
                                    retain_graph=i < controlled - 1, allow_unused=True), dice_gradient)
                if g is not None and h is not None)
            for i in range(controlled)])
        summary = mean_across_ranks(torch.cat([dice.detach()[None], alignment.detach()]).double().cpu()).numpy()
        alphas = np.exp(betas - betas.max(axis=1, keepdims=True))
        alphas /= alphas.sum(axis=1, keepdims=True)
        network.zero_grad(set_to_none=True)
        return np.clip(summary[0] - self.optimizer.param_groups[0]["lr"] * alphas @ summary[1:], 0.0, 1.0)


class nnUNetTrainerRLDeepSup_randomSearch(nnUNetTrainerRLDeepSup):
    """Control: the same candidates, scores and keep-the-best rule, controllers frozen at their initial policy."""
    controllers_learn = False


class nnUNetTrainerRLDeepSup_faithful(RLDeepSupervisionTrainer):
    """The paper's bilevel DAS: per RL epoch, each of the K weightings trains a copy of the network for one epoch
    from the same start (weights, optimizer state with nnU-Net's momentum, grad scaler) with nnU-Net's own
    ``train_step``, each copy on batches of its own; every copy is scored on the same
    ``num_val_iterations_per_epoch`` reward batches and the best one continues (≈ K× cost per RL epoch)."""

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._best_outputs: list[dict] = []
        self._scheduled_iterations = self.num_iterations_per_epoch
        if self.in_rl_phase():
            self.rl_round(self.train_candidates)

    def candidate_batches(self):
        """A function returning one candidate's training batches: a fresh epoch's worth per call."""
        return lambda: (next(self.dataloader_train) for _ in range(self._scheduled_iterations))

    def reward_batches(self) -> int:
        return self.num_val_iterations_per_epoch

    def train_candidates(self, betas: np.ndarray) -> list[float]:
        """Train each candidate from the same start, score each on the same reward batches, keep the best copy.

        The best copy's weights, optimizer state and training losses become this epoch's; nnU-Net's loop then runs
        only the epoch's remaining iterations, so an epoch still has ``num_iterations_per_epoch`` training steps.
        """
        start = self._training_state()
        reward_batches = [next(self.dataloader_reward) for _ in range(self.reward_batches())]
        batches = self.candidate_batches()
        dice, best = [], None
        for beta in betas:
            self._load_training_state(start)
            self.das_weights.keep(beta)
            self._apply_weights()
            outputs = [self.train_step(batch) for batch in batches()]
            dice.append(self._reward_dice(reward_batches))
            if best is None or dice[-1] > best[0]:
                best = None  # release the previous best copy before snapshotting: two copies at most, not three
                best = (dice[-1], self._training_state(), outputs)
        self._load_training_state(best[1])
        self._best_outputs = best[2]
        self.num_iterations_per_epoch = self._scheduled_iterations - len(self._best_outputs)
        return dice

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        self.num_iterations_per_epoch = self._scheduled_iterations
        super().on_train_epoch_end(self._best_outputs + train_outputs)

    def _training_state(self) -> dict:
        return copy.deepcopy({"network": self.network.state_dict(), "optimizer": self.optimizer.state_dict(),
                              "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler else None})

    def _load_training_state(self, state: dict) -> None:
        """Load ``state`` without letting training change it: the network's ``load_state_dict`` copies the values,
        but torch's ``Optimizer.load_state_dict`` adopts the given momentum tensors, which the next step updates in
        place, so the optimizer gets a copy (else each candidate's training would leak into the next one's start)."""
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        if self.grad_scaler is not None:
            self.grad_scaler.load_state_dict(state["grad_scaler"])

    def _reward_dice(self, reward_batches: list[dict]) -> float:
        """Mean foreground Dice over the batches as nnU-Net's per-epoch pseudo Dice (tp/fp/fn summed, all ranks).

        nnU-Net's ``validation_step`` rewrites an ignore label in its target in place, so each call gets a copy.
        """
        self.network.eval()
        with torch.no_grad():
            counts = [self.validation_step({**batch, "target": [t.clone() for t in batch["target"]]})
                      for batch in reward_batches]
        self.network.train()
        tp, fp, fn = (mean_across_ranks(torch.tensor(np.sum([c[key] for c in counts], axis=0), dtype=torch.float64))
                      for key in ("tp_hard", "fp_hard", "fn_hard"))
        return hard_foreground_dice(tp, fp, fn)


class nnUNetTrainerRLDeepSup_shortHorizon(nnUNetTrainerRLDeepSup_faithful):
    """The paper's bilevel scoring on a short horizon: each copy trains ``trial_steps`` steps on the *same*
    training batches (common random numbers: the candidates differ only by their weighting) and is scored on
    ``trial_reward_batches`` reward batches. Costs (K − 1)·trial_steps extra training steps per RL epoch."""

    def initialize(self) -> None:
        super().initialize()
        hp = self.rl_hyperparameters(COMPONENT)
        self.trial_steps, self.trial_reward_batches = hp.trial_steps, hp.trial_reward_batches

    def candidate_batches(self):
        common = [next(self.dataloader_train) for _ in range(min(self.trial_steps, self._scheduled_iterations))]
        return lambda: common

    def reward_batches(self) -> int:
        return self.trial_reward_batches


class nnUNetTrainerAWSnet(nnUNetTrainerPAM, nnUNetTrainerRLDeepSup):
    """AWSnet's network on nnU-Net's topology: PAM on every skip connection and DAS (look-ahead mode) on the
    deep-supervision weights."""
