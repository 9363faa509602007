"""Per-voxel actor-critic: every voxel is an agent; a policy head and a value head at full patch resolution.

Shared by the trainers in which each voxel acts on a map (PixelDRL-MG's {set to background, keep} refinement,
MRL-Seg's {mask, retain} on the input). What the actions do, and the reward, belong to each method; this module holds
what both need:

- :class:`SelfAttentionModule`: PixelDRL-MG's SAM, eq. 1;
- :class:`VoxelHead`: a stack of (dilated) convolutions ending in a 1×1 convolution, the paper's DC;
- :class:`VoxelActorCritic`: SAM on the fixed features, then a policy head (action logits per voxel) and a value head
  (V per voxel) on [features, extra state channels], with the neighbour-value convolution ω of the returns; the
  heads' response to the fixed features is computed once per episode (:class:`EpisodeFeatures`);
- :class:`NeighbourReturns`: the learned neighbour weighting ω of eq. 8 and PixelDRL-MG's discounted returns
  (Algorithm 1), R(t) = r(t) + γ R(t+1) with R(T) = ω ∗ V(s(T)); MRL-Seg's returns (its eqs. 11-12, ω applied at
  every step, with its difficulty term) are :func:`nnunet_rl.mrl_seg.difficulty_returns` on the same ``omega``;
- :func:`sample_actions` / :func:`greedy_actions` and :func:`a2c_losses` (eqs. 13-15), which return ``None`` when
  a reward, value or advantage is not finite, so nothing non-finite reaches the weights;
- :func:`greedy_rollout`: a greedy episode that stops running the heads once a step changes nothing.
- :func:`full_resolution`: the full-resolution member of nnU-Net's deep-supervision outputs, where rewards are
  computed.

Y. Liu, D. Yuan, Z. Xu, Y. Zhan, H. Zhang, J. Lu, T. Lukasiewicz, "Pixel level deep reinforcement learning for
accurate and robust medical image segmentation", Scientific Reports (published 10 March 2025; our copy of the
paper gives no DOI) (PixelDRL-MG); R. Furuta, N. Inoue, T. Yamasaki, "PixelRL: Fully convolutional network with
reinforcement learning for image processing", IEEE Trans. Multimedia 22, 1704-1719 (2019) (the per-pixel A3C and
ω it builds on).
"""
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn


class SelfAttentionModule(nn.Module):
    """PixelDRL-MG's SAM (eq. 1): M_att = Softmax(W ⊙ f + f), W a 1×1 convolution.

    The paper does not say over which axis the softmax runs or how M_att meets f. Here it runs over the voxels of the
    patch, per channel (the "long-distance dependency" the paper asks for: every voxel's weight depends on the whole
    patch), and the output reweights f by M_att / max M_att ∈ (0, 1] (per sample and channel): f itself where M_att is
    uniform, never larger than f, so no precision (fp16 included) can overflow however many voxels a patch has.
    """

    def __init__(self, channels: int, conv_op: type[nn.Module]):
        super().__init__()
        self.project = conv_op(channels, channels, kernel_size=1, bias=True)

    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        return (self.project(features) + features).flatten(2).float()

    def attention(self, features: torch.Tensor) -> torch.Tensor:
        """M_att, shape of ``features``; sums to 1 over the voxels of each sample and channel."""
        return torch.softmax(self._logits(features), dim=2).view_as(features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self._logits(features)
        relative = torch.exp(logits - logits.amax(dim=2, keepdim=True))  # M_att / max M_att
        return features * relative.view_as(features).to(features.dtype)


class VoxelHead(nn.Module):
    """conv(k=3, dilation d) → norm → nonlinearity for each d in ``dilations``, then a 1×1 convolution to
    ``out_channels``: an output per voxel at the input's resolution (padding = dilation). PixelDRL-MG puts dilated
    convolutions (DC) in every layer of both heads; dilations of 1 give the same head without DC.

    The head's input is [fixed, state]: ``fixed_channels`` features that stay the same over an episode, then
    ``state_channels`` that change every step. A convolution is linear in its input channels, so the first one splits
    into conv_fixed(fixed) + conv_state(state): :meth:`respond` computes the fixed share (with the bias) once per
    episode, :meth:`forward` adds the state's share every step. That is the convolution of the concatenation (same
    parameters, same function, up to rounding), at a fraction of its cost per step when the state has few channels.
    """

    def __init__(self, fixed_channels: int, state_channels: int, hidden_channels: int, out_channels: int,
                 dilations: Sequence[int], conv_op: type[nn.Module], norm_op: type[nn.Module] | None,
                 norm_op_kwargs: dict | None, nonlin: type[nn.Module] | None, nonlin_kwargs: dict | None):
        super().__init__()
        if not dilations:
            raise ValueError("a head needs at least one 3^d convolution (head_dilations / head_layers ≥ 1)")
        layers: list[nn.Module] = []
        channels = fixed_channels + state_channels
        for dilation in dilations:
            layers.append(conv_op(channels, hidden_channels, kernel_size=3, padding=dilation, dilation=dilation))
            if norm_op is not None:
                layers.append(norm_op(hidden_channels, **(norm_op_kwargs or {})))
            if nonlin is not None:
                layers.append(nonlin(**(nonlin_kwargs or {})))
            channels = hidden_channels
        self.body = nn.Sequential(*layers)
        self.out = conv_op(channels, out_channels, kernel_size=1, bias=True)
        self.fixed_channels, self.hidden_channels, self.num_layers = fixed_channels, hidden_channels, len(dilations)

    def respond(self, fixed: torch.Tensor) -> torch.Tensor:
        """The first convolution's response to the fixed features, bias included: once per episode."""
        first = self.body[0]
        return first._conv_forward(fixed, first.weight[:, :self.fixed_channels], first.bias)

    def forward(self, fixed_response: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """The head's output for the fixed features (as :meth:`respond` gave them) and this step's ``state``."""
        first = self.body[0]
        hidden = fixed_response + first._conv_forward(state, first.weight[:, self.fixed_channels:], None)
        return self.out(self.body[1:](hidden))

    def compute_conv_feature_map_size(self, input_size) -> int:
        """Voxels of the feature maps one forward stores: conv, norm and nonlinearity per layer, and the output."""
        voxels = int(np.prod(input_size, dtype=np.int64))
        return voxels * (3 * self.hidden_channels * self.num_layers + self.out.out_channels)


class NeighbourReturns(nn.Module):
    """PixelDRL-MG's returns: eq. 8's neighbour values weighted by a learned convolution ω, inside Algorithm 1's
    discounted sum (lines 16-18)::

        R(T) = ω ∗ V(s(T)),   R(t) = r(t) + γ R(t+1)

    For the last step this is eq. 8, R_i = r_i + γ Σ_{j∈N(i)} ω_{i−j} V(s_j(t+1)); earlier steps add their own
    rewards, discounted, as Algorithm 1 does: ω weights the values of neighbours (eq. 8), never their rewards. ω is a
    single-channel ``kernel_size``^d convolution without bias, initialised to the identity (the per-voxel A3C
    return).
    """

    def __init__(self, conv_op: type[nn.Module], kernel_size: int = 3):
        super().__init__()
        self.omega = conv_op(1, 1, kernel_size=kernel_size, padding=kernel_size // 2, bias=False)
        with torch.no_grad():
            self.omega.weight.zero_()
            self.omega.weight[(0, 0, *[kernel_size // 2] * (self.omega.weight.ndim - 2))] = 1.0

    def forward(self, rewards: Sequence[torch.Tensor], next_value: torch.Tensor, gamma: float) -> list[torch.Tensor]:
        """R(0) … R(T−1) for rewards r(0) … r(T−1), each (B, 1, *spatial); ``next_value`` is V(s(T))."""
        returns = []
        following = self.omega(next_value)
        for reward in reversed(rewards):
            following = reward + gamma * following
            returns.append(following)
        return returns[::-1]


class EpisodeFeatures:
    """SAM(features) of one episode, and each head's first-layer response to them (:meth:`VoxelHead.respond`),
    computed the first time the head runs on them: a greedy step asks the policy head alone, a bootstrap the value
    head alone."""

    def __init__(self, attended: torch.Tensor):
        self.attended = attended
        self._responses: dict[int, torch.Tensor] = {}

    def response(self, head: "VoxelHead") -> torch.Tensor:
        if id(head) not in self._responses:
            self._responses[id(head)] = head.respond(self.attended)
        return self._responses[id(head)]


class VoxelActorCritic(nn.Module):
    """SAM (optional) on fixed features, then policy and value heads on [SAM(features), state channels].

    ``features`` come from a segmentation network and stay fixed over an episode, so SAM and the heads' share of
    them run once per episode (:meth:`attend`); the ``state`` channels (e.g. the current label map, one-hot) change
    every step, and only their share and the rest of the heads run per step (:meth:`forward`).
    """

    def __init__(self, feature_channels: int, state_channels: int, num_actions: int, conv_op: type[nn.Module],
                 norm_op: type[nn.Module] | None = None, norm_op_kwargs: dict | None = None,
                 nonlin: type[nn.Module] | None = nn.LeakyReLU, nonlin_kwargs: dict | None = None,
                 head_channels: int = 16, dilations: Sequence[int] = (1, 2, 4), use_sam: bool = True,
                 omega_kernel_size: int = 3):
        super().__init__()
        self.sam = SelfAttentionModule(feature_channels, conv_op) if use_sam else None
        head = dict(fixed_channels=feature_channels, state_channels=state_channels, hidden_channels=head_channels,
                    dilations=dilations, conv_op=conv_op, norm_op=norm_op, norm_op_kwargs=norm_op_kwargs,
                    nonlin=nonlin, nonlin_kwargs=nonlin_kwargs)
        self.policy = VoxelHead(out_channels=num_actions, **head)
        self.value = VoxelHead(out_channels=1, **head)
        self.returns = NeighbourReturns(conv_op, omega_kernel_size)
        with torch.no_grad():
            self.value.out.weight.zero_()
            self.value.out.bias.zero_()

    def bias_policy(self, probabilities: Sequence[float]) -> None:
        """Start the policy at the given action probabilities everywhere (zero output weights, log-probability
        biases), e.g. near "keep" so that an untrained head leaves a map as it is."""
        with torch.no_grad():
            self.policy.out.weight.zero_()
            self.policy.out.bias.copy_(torch.log(torch.as_tensor(probabilities, dtype=torch.float32)))

    def attend(self, features: torch.Tensor) -> EpisodeFeatures:
        """SAM(``features``), with what the heads compute from it once per episode."""
        return EpisodeFeatures(features if self.sam is None else self.sam(features))

    def forward(self, features: EpisodeFeatures, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Action logits (B, actions, *spatial) and values (B, 1, *spatial)."""
        return self.action_logits(features, state), self.state_value(features, state)

    def state_value(self, features: EpisodeFeatures, state: torch.Tensor) -> torch.Tensor:
        """V alone (B, 1, *spatial), e.g. to bootstrap the returns at the end of an episode."""
        return self.value(features.response(self.value), state.to(features.attended.dtype))

    def action_logits(self, features: EpisodeFeatures, state: torch.Tensor) -> torch.Tensor:
        """The policy head alone (B, actions, *spatial): all a greedy step needs."""
        return self.policy(features.response(self.policy), state.to(features.attended.dtype))

    def compute_conv_feature_map_size(self, input_size, steps: int) -> int:
        """Feature-map voxels of SAM once and both heads ``steps`` times (what a training episode keeps for the
        backward pass)."""
        voxels = int(np.prod(input_size, dtype=np.int64))
        sam = 0 if self.sam is None else 3 * self.sam.project.in_channels * voxels
        return sam + steps * (self.policy.compute_conv_feature_map_size(input_size) +
                              self.value.compute_conv_feature_map_size(input_size))


def full_resolution(output: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """The full-resolution member of nnU-Net's deep-supervision outputs or targets (a list, finest first), or
    ``output`` itself when deep supervision is off."""
    return output[0] if isinstance(output, (list, tuple)) else output


def sample_actions(logits: torch.Tensor, generator: torch.Generator | None = None, *,
                   fallback: int) -> torch.Tensor:
    """One action per voxel drawn from softmax(``logits``) over dim 1 by inverse CDF; (B, *spatial), int64.
    A voxel whose logits are not all finite gets ``fallback`` (the action that leaves it as it is, as the greedy
    paths do) rather than whatever the comparison with NaN yields. ``generator`` must live on ``logits``' device."""
    cumulative = torch.softmax(logits.float(), dim=1).cumsum(dim=1)
    uniform = torch.rand(cumulative[:, :1].shape, generator=generator, device=logits.device)
    drawn = (uniform > cumulative[:, :-1]).sum(dim=1)
    return torch.where(torch.isfinite(logits).all(dim=1), drawn, fallback)


def greedy_actions(logits: torch.Tensor) -> torch.Tensor:
    """The most probable action per voxel; (B, *spatial), int64."""
    return logits.argmax(dim=1)


def greedy_rollout(initial: torch.Tensor, step: Callable[[torch.Tensor], torch.Tensor],
                   steps: int) -> list[torch.Tensor]:
    """The maps m(0) = ``initial``, m(t+1) = ``step``(m(t)), t < ``steps``, of a greedy episode whose state is m(t)
    (with inputs fixed over the episode). A greedy step is a function of the state, so once a step leaves the map
    unchanged every later step would too: the remaining maps repeat it and the heads are not run again. The result is
    the same as running every step; the cost follows the steps that change something."""
    maps = [initial]
    while len(maps) <= steps:
        maps.append(step(maps[-1]))
        if torch.equal(maps[-1], maps[-2]):
            maps.extend([maps[-1]] * (steps + 1 - len(maps)))
    return maps


@dataclass
class A2CLosses:
    policy: torch.Tensor
    value: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.policy + self.value


def a2c_losses(logits: Sequence[torch.Tensor], values: Sequence[torch.Tensor], actions: Sequence[torch.Tensor],
               returns: Sequence[torch.Tensor], mask: torch.Tensor | Sequence[torch.Tensor] | None = None,
               policy_mask: torch.Tensor | Sequence[torch.Tensor] | None = None) -> A2CLosses | None:
    """Per-voxel advantage actor-critic losses over an episode (PixelDRL-MG eqs. 13-15), averaged over the voxels
    and the steps::

        value:  mean((R − V)²)                 (eq. 13)
        policy: −mean(log π(a|s) · A),  A = R − V, a constant here   (eqs. 14-15)

    ``mask`` (one (B, 1, *spatial) boolean map for all steps, or one per step) selects the voxels of both terms, e.g.
    those without an ignore label; ``policy_mask`` (likewise) those of the policy term, where it differs: voxels
    whose action at that step can change nothing (MRL-Seg's already masked voxels) carry no policy gradient, but
    their values are still learned. Without ``policy_mask`` the policy term uses ``mask``.

    The advantage is detached (as in PixelRL's reference implementation): the policy term moves only the policy and
    what feeds it; ω learns from the value term. ``None`` when a return, value or advantage is not finite: the caller
    skips the update and records it.
    """
    masks = _per_step(mask, len(logits))
    policy_masks = masks if policy_mask is None else _per_step(policy_mask, len(logits))
    policy_terms, value_terms = [], []
    for step_logits, value, action, target, step_mask, step_policy_mask in zip(logits, values, actions, returns,
                                                                               masks, policy_masks):
        value, target = value.float(), target.float()
        advantage = (target - value).detach()
        log_pi = torch.log_softmax(step_logits.float(), dim=1).gather(1, action[:, None])
        policy_terms.append(_masked_mean(-log_pi * advantage, step_policy_mask))
        value_terms.append(_masked_mean((target - value) ** 2, step_mask))
    losses = A2CLosses(policy=torch.stack(policy_terms).mean(), value=torch.stack(value_terms).mean())
    # a non-finite return, value or advantage anywhere (masked voxels included: NaN·0 is NaN) makes a mean non-finite
    return losses if bool(torch.isfinite(losses.total)) else None


def _per_step(mask: torch.Tensor | Sequence[torch.Tensor] | None, steps: int) -> list[torch.Tensor | None]:
    if mask is None or isinstance(mask, torch.Tensor):
        return [mask] * steps
    if len(mask) != steps:
        raise ValueError(f"{len(mask)} masks for {steps} steps")
    return list(mask)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)
