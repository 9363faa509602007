"""RL-U2Net's losses beyond Dice + CE (Qu and Zhao): AGWD (eqs. 18-19), the alignment loss (eq. 17), soft voting.

The final loss (eq. 20) is ``AGWD.balance("dice", ...) + AGWD.balance("ce", ...) + λ₁·Σᵢ alignment_loss(...)``
over the aligned stages i; the ensemble decision averages the two branches' probabilities (``soft_vote``).
The paper gives none of γ, δ, α, β or the InfoNCE temperature; our defaults are documented where they are used.
"""
import math
from typing import Sequence

import torch
import torch.nn.functional as F

from nnunet_rl.devices import copy_to_device


def agwd_weight(loss_slow: torch.Tensor | float, loss_fast: torch.Tensor | float, gamma: float,
                delta: float) -> torch.Tensor:
    """w = tanh(γ·(L_slow − L_fast − δ)) (eq. 18), in (−1, 1)."""
    return torch.tanh(gamma * (torch.as_tensor(loss_slow) - torch.as_tensor(loss_fast) - delta))


class AGWD:
    """Adaptive Gradient Weight Distributor: rebalances one loss kind between the two branches (eqs. 18-19).

    For each loss kind ("dice", "ce") it keeps a detached running mean (EMA with ``momentum``; the first call
    takes the loss itself) of each branch's loss. The branch with the higher running loss is the slow one;
    w = tanh(γ(L̄_slow − L̄_fast − δ)) is computed from the running values and detached, and the balanced loss is
    L_fast·(1 − w) + L_slow·(1 + w) (eq. 19) of the current losses, so gradients reach both branches.

    Our defaults (the paper gives none): γ = 1 (losses of order 1 give w of order 0.1-0.7, never saturated),
    δ = 0 (no dead zone: any gap shifts weight to the slow branch), momentum 0.9 (a gap must persist over about
    ten iterations, not one noisy batch, to move w; 0 uses the current losses as the paper's formula reads).
    """

    def __init__(self, gamma: float = 1.0, delta: float = 0.0, momentum: float = 0.9):
        self.gamma, self.delta, self.momentum = gamma, delta, momentum
        self.running: dict[str, torch.Tensor] = {}  # kind -> (2,) running losses of branches a, b
        self._last: dict[str, torch.Tensor] = {}  # kind -> w of the last call

    @property
    def last_weight(self) -> dict[str, float]:
        """Telemetry: kind -> w of the last call (read after the step: converting waits for the device)."""
        return {kind: float(weight) for kind, weight in self._last.items()}

    def balance(self, kind: str, loss_a: torch.Tensor, loss_b: torch.Tensor) -> torch.Tensor:
        """Update the running losses of ``kind`` and return the balanced loss of eq. 19 (differentiable)."""
        current = torch.stack((loss_a.detach(), loss_b.detach())).float()
        previous = self.running.get(kind)
        running = current if previous is None else \
            self.momentum * previous.to(current.device) + (1 - self.momentum) * current
        self.running[kind] = running
        a_is_slow = running[0] >= running[1]
        slow, fast = torch.where(a_is_slow, loss_a, loss_b), torch.where(a_is_slow, loss_b, loss_a)
        weight = agwd_weight(running.max(), running.min(), self.gamma, self.delta)
        self._last[kind] = weight.detach()
        return fast * (1 - weight) + slow * (1 + weight)

    def state_dict(self) -> dict:
        return {"running": {kind: value.cpu().clone() for kind, value in self.running.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.running = {kind: value.clone() for kind, value in state_dict["running"].items()}


def paired_tokens(maps: Sequence[torch.Tensor], max_tokens: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The channel vectors of each map (B, C, *spatial), all of one shape, at the same ≤ max_tokens voxels of the
    batch, stacked: ``(len(maps), n, C)``. All voxels when there are no more than max_tokens, else a random subset
    drawn with ``generator`` (on the CPU, so a seed picks the same voxels on every device; the indices reach the device
    in one copy that does not wait for it). Only the chosen voxels are gathered, so the cost does not grow with the
    maps."""
    shapes = {tuple(m.shape) for m in maps}
    if len(shapes) != 1:
        raise ValueError(f"aligned features must share one grid, got shapes {sorted(shapes)}")
    batch, channels, spatial = maps[0].shape[0], maps[0].shape[1], maps[0].shape[2:]
    voxels = math.prod(spatial)
    if batch * voxels <= max_tokens:
        return torch.stack([m.movedim(1, -1).reshape(-1, channels) for m in maps])
    keep = torch.randperm(batch * voxels, generator=generator)[:max_tokens]
    index = copy_to_device(torch.stack((keep // voxels, *torch.unravel_index(keep % voxels, spatial))), maps[0].device)
    index = (index[0], slice(None), *index[1:])
    return torch.stack([m[index] for m in maps])


def token_similarities(tokens_a: torch.Tensor, tokens_b: torch.Tensor) -> torch.Tensor:
    """The cosine similarity of every pair of tokens (..., n, C) × (..., n, C) -> (..., n, n), in float32; the diagonal
    holds the pairs of the same voxel."""
    return F.normalize(tokens_a.float(), dim=-1) @ F.normalize(tokens_b.float(), dim=-1).transpose(-1, -2)


def info_nce(similarities: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Symmetric InfoNCE (eq. 17's L_InfoNCE) from the (..., n, n) :func:`token_similarities` of two token sets, (...).

    Logits a_i·b_j / T between the L2-normalised tokens; the positive of token i is token i of the other set; the
    loss is the mean of the a→b and b→a cross-entropies (softmax over a row, and over a column, at the diagonal). Our
    default T = 0.1 (the usual 0.07-0.2 of contrastive learning).
    """
    logits = similarities / temperature
    a_to_b = logits.log_softmax(dim=-1).diagonal(dim1=-2, dim2=-1)
    b_to_a = logits.log_softmax(dim=-2).diagonal(dim1=-2, dim2=-1)
    return -(a_to_b.mean(dim=-1) + b_to_a.mean(dim=-1)) / 2


def cosine_alignment(similarities: torch.Tensor) -> torch.Tensor:
    """1 − the mean cosine similarity of paired tokens (eq. 17's L_Cosine): the diagonal of
    :func:`token_similarities`, (...)."""
    return 1 - similarities.diagonal(dim1=-2, dim2=-1).mean(dim=-1)


def alignment_loss(own: Sequence[torch.Tensor], aligned: Sequence[torch.Tensor], alpha: float = 1.0,
                   beta: float = 1.0, temperature: float = 0.1, max_tokens: int = 256,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Σ over pairs (own[i], aligned[i]) of L_align = α·L_InfoNCE + β·L_Cosine (eq. 17), maps (B, C, *spatial), each
    pair on one grid.

    Both terms are taken on the channel vectors of the same ≤ max_tokens voxels (:func:`paired_tokens`), from one
    similarity matrix: InfoNCE needs a bounded token set (a 256² logit matrix by default), and the cosine term over
    a uniform random subset is an unbiased estimate of its mean over all voxels at a cost that does not grow with
    the map (docs/rl_u2net.md). Pairs of one shape (the two directions of a stage) share their voxels and are computed
    as one batch: fewer operators, hence GPU kernels, than pair by pair. Our defaults α = β = 1:
    the paper calls them equilibrium weights without values; both terms are O(1) at the start
    (InfoNCE ≤ log(max_tokens), cosine ≤ 2).
    """
    groups: dict[tuple, list[int]] = {}
    for i, a in enumerate(own):
        groups.setdefault(tuple(a.shape), []).append(i)
    total = 0
    for members in groups.values():
        tokens = paired_tokens([own[i] for i in members] + [aligned[i] for i in members], max_tokens, generator)
        similarities = token_similarities(*tokens.chunk(2))
        total = total + (alpha * info_nce(similarities, temperature) + beta * cosine_alignment(similarities)).sum()
    return total


def soft_vote(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """The two branches' ensemble as logits: log((softmax(a) + softmax(b)) / 2) over the channel axis (dim 1).

    Computed as logsumexp of the two log-softmaxes minus log 2, so it stays finite for logits of any size;
    softmax of the result is the averaged probability, so nnU-Net's predictor can treat it as logits.
    """
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"branch logits differ in shape: {tuple(logits_a.shape)} and {tuple(logits_b.shape)}")
    log_probs = torch.stack((F.log_softmax(logits_a, dim=1), F.log_softmax(logits_b, dim=1)))
    return torch.logsumexp(log_probs, dim=0) - math.log(2)
