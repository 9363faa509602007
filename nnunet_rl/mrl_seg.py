"""MRL-Seg's rewards and returns: the foreground/background prior (eq. 3), the cross-entropy reward (eqs. 4-5), the
approximate difficulty of the pixels, ADP (eq. 10), and the returns that weigh it with the neighbour convolution ω
(eqs. 11-12).

F. Yang, X. Li, H. Duan, F. Xu, Y. Huang, X. Zhang, Y. Long, Y. Zheng, "MRL-Seg: Overcoming imbalance in medical
image segmentation with multi-step reinforcement learning", IEEE Journal of Biomedical and Health Informatics 28(2),
858-869 (2024), DOI 10.1109/jbhi.2023.3336726, §III.B-C.

Every function here is pure: maps are (B, 1, *spatial) per voxel (labels (B, *spatial), logits (B, C, *spatial)),
2D and 3D alike. The agents, their actions {mask, retain} and the A2C losses are in
:mod:`nnunet_rl.voxel_actor_critic`; ω is its :attr:`NeighbourReturns.omega`.
"""
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_rl.pixel_rl import one_hot

_CONVOLUTIONS = {2: F.conv2d, 3: F.conv3d}


def foreground_prior(foreground: torch.Tensor, background: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Eq. 3's global term α(N_F/N_B + β·N_B/N_F) from the voxel counts ``foreground`` = N_F and ``background`` =
    N_B (any shape, e.g. (B,); the dtype is kept).

    With x = N_F/N_B (the paper's x, a ratio of counts, not the foreground fraction N_F/N) the term is α·f(x),
    f(x) = x + β/x, whose extremum lies at x = √β: α ∈ (−1, 0) makes it a maximum of the reward, and β ∈ (0.2, 0.3)
    puts it at N_F/N_B ∈ (0.447, 0.548). Counts are clamped to ≥ 1: an empty foreground scores as one voxel of
    foreground, α(1/N_B + β·N_B), the term's most negative value for that N_B, instead of −∞ (an empty background
    likewise).
    """
    foreground, background = foreground.clamp(min=1), background.clamp(min=1)
    return alpha * (foreground / background + beta * background / foreground)


def global_reward(rewards: torch.Tensor, foreground: torch.Tensor, background: torch.Tensor, alpha: float,
                  beta: float) -> torch.Tensor:
    """Eq. 3, r̄* = (1/N)(Σ_i r_i + α(N_F/N_B + β·N_B/N_F)) per sample, shape (B,): ``rewards`` (B, 1, *spatial) are
    the local rewards r_i of the N voxels (eq. 5), ``foreground``/``background`` (B,) the counts of
    :func:`foreground_prior`. The prior is divided by N as printed, so it weighs like one voxel's reward."""
    voxels = rewards[0].numel()
    return (rewards.flatten(1).sum(dim=1) + foreground_prior(foreground, background, alpha, beta)) / voxels


def prior_rewards(rewards: torch.Tensor, foreground: torch.Tensor, background: torch.Tensor, alpha: float,
                  beta: float) -> torch.Tensor:
    """The per-voxel rewards r*(t) of eq. 12, (B, 1, *spatial): r_i plus eq. 3's prior divided by N, the map whose
    mean over the voxels is :func:`global_reward`."""
    prior = foreground_prior(foreground, background, alpha, beta) / rewards[0].numel()
    return rewards + prior.view(-1, *[1] * (rewards.ndim - 1)).to(rewards.dtype)


def cross_entropy(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Eq. 4 per voxel, multi-class: −log softmax(``logits``)[y_i], shape (B, 1, *spatial). For two classes this is
    eq. 4's −y log p − (1 − y) log(1 − p) with p the softmax probability of the foreground."""
    return F.cross_entropy(logits.float(), reference.long(), reduction="none").unsqueeze(1)


def cross_entropy_reward(previous_logits: torch.Tensor, current_logits: torch.Tensor, reference: torch.Tensor,
                         valid: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 5 per voxel: r_i(t) = CE_i(t−1) − CE_i(t), (B, 1, *spatial), positive where the segmentation of step t
    puts more probability on the reference label (B, *spatial) than that of step t−1. 0 where ``valid``
    (B, 1, *spatial) is false (e.g. nnU-Net's ignore label, whose value need not be a class of the logits)."""
    if valid is not None:
        reference = torch.where(valid[:, 0], reference, torch.zeros_like(reference))
    reward = cross_entropy(previous_logits, reference) - cross_entropy(current_logits, reference)
    return reward if valid is None else torch.where(valid, reward, torch.zeros_like(reward))


def difficulty(reference: torch.Tensor, window: int) -> torch.Tensor:
    """ADP, eq. 10: per voxel i, the fraction of its window F_i whose reference label differs from y_i, shape
    (B, 1, *spatial), in [0, 1]; ``reference`` holds integer labels ≥ 0, (B, *spatial).

    F_i is the ``window``^d cube centred on i, without i itself (the paper has 𝔍_i = 1 "if the class labels of all
    pixels in F_i are different from x_i", impossible if F_i held x_i) and without the voxels outside the image.
    Counted per label with one grouped convolution of the one-hot map. MRL-Seg's F_i is the window N(i) of eq. 11, so
    ``window`` is ω's kernel size.
    """
    if window < 3 or window % 2 == 0:
        raise ValueError(f"the ADP window must be odd and at least 3, got {window}")
    labels = one_hot(reference, int(reference.max()) + 1)
    classes, dims = labels.shape[1], labels.ndim - 2
    kernel = labels.new_ones((classes, 1, *[window] * dims))
    counts = _CONVOLUTIONS[dims](labels, kernel, padding=window // 2, groups=classes)
    inside = counts.sum(dim=1, keepdim=True)
    same = (counts * labels).sum(dim=1, keepdim=True)
    return (inside - same) / (inside - 1).clamp(min=1)


def difficulty_returns(rewards: Sequence[torch.Tensor], bootstrap: torch.Tensor, adp: torch.Tensor,
                       omega: nn.Module, gamma: float) -> list[torch.Tensor]:
    """R(0) … R(T−1) of eqs. 11-12 for the rewards r*(0) … r*(T−1) (:func:`prior_rewards`), each (B, 1, *spatial);
    ``bootstrap`` is R(T) = V(s(T)), ``adp`` the map 𝔍 of :func:`difficulty`, ``omega`` the single-channel
    convolution w without bias (:attr:`NeighbourReturns.omega`, zero padding)::

        R_i(t) = r*_i(t) + γ Σ_{j∈N(i)} w_{i−j} (𝔍_i + R_j(t+1)),   R(T) = V(s(T))
               = r*(t) + γ (𝔍 · (w ∗ 1) + w ∗ R(t+1))

    For one step this is eq. 11 as printed: 𝔍 of the centre voxel i, weighted by the weights of i's neighbours
    inside the image (w ∗ 1). Over several steps eq. 11 is applied at every step with V(s(t+1)) replaced by the
    return R(t+1), as eq. 12 follows from eq. 6; eq. 12 as printed omits 𝔍, and with 𝔍 = 0 this is eq. 12. ω learns
    through both terms (eq. 13).
    """
    bonus = adp * omega(torch.ones_like(adp))
    returns = []
    following = bootstrap
    for reward in reversed(rewards):
        following = reward + gamma * (bonus + omega(following))
        returns.append(following)
    return returns[::-1]
