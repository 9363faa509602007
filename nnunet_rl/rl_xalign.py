"""RL-U2Net's RL-XAlign module: cross-modal attention (CMA), PoseAlign and the fusion of eq. 7.

J. Qu and J. Zhao, "RL-U2Net: A Dual-Branch UNet with Reinforcement Learning-Assisted Multimodal Feature Fusion for
Accurate 3D Whole-Heart Segmentation" (preprint, no DOI), eqs. 1-7.

For one encoder stage with a primary map F_p and an auxiliary map F_a, both shaped (B, C, *spatial) (2D or 3D)::

    F_aligned = mean_{a in actions} R_a(F_a)                      PoseAlign, eq. 6
    F_cross   = W⁻¹(Conv1D_o(softmax(QᵀK/√d) Vᵀ))                 CMA, eqs. 1-5, Q from F_p, K and V from F_aligned
    F_out     = λ·F_cross + (1 − λ)·F_p                           fusion, eq. 7

The rotation actions are chosen by the caller: sampled from π = softmax(θ/τ) during the RL phase, the greedy
rotation afterwards and at inference. PoseAlign only holds the policy parameters θ and applies the rotations;
θ is learned by PPO through :meth:`PoseAlign.log_prob`, never by back-propagating through the rotation.
Rotation matrices and their indices are those of :mod:`nnunet_rl.rotations` (array-axis order, identity first).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnunet_rl.devices import copy_to_device
from nnunet_rl.mirroring import Mirroring
from nnunet_rl.rotations import cube_rotations, verify_rotation_group


def _window_partition(x: torch.Tensor, window: list[int]) -> torch.Tensor:
    """W(·): (B, C, *spatial) with spatial divisible by window -> (B·nWindows, tokens, C), batch-major, channels last
    (the layout the projections and the attention read without further copies)."""
    b, c, spatial = x.shape[0], x.shape[1], x.shape[2:]
    dim = len(window)
    grid = [n // w for n, w in zip(spatial, window)]
    x = x.reshape(b, c, *[s for pair in zip(grid, window) for s in pair])
    order = [0, *(2 + 2 * i for i in range(dim)), *(3 + 2 * i for i in range(dim)), 1]
    return x.permute(order).reshape(b * math.prod(grid), math.prod(window), c)


def _window_reverse(tokens: torch.Tensor, batch: int, spatial: list[int], window: list[int]) -> torch.Tensor:
    """W⁻¹(·): the inverse of :func:`_window_partition` for a map of the given batch size and spatial shape."""
    dim, c = len(window), tokens.shape[-1]
    grid = [n // w for n, w in zip(spatial, window)]
    x = tokens.reshape(batch, *grid, *window, c)
    order = [0, 2 * dim + 1, *(i for pair in zip(range(1, dim + 1), range(dim + 1, 2 * dim + 1)) for i in pair)]
    return x.permute(order).reshape(batch, c, *spatial)


class CrossModalAttention(nn.Module):
    """CMA, eqs. 1-5: single-head attention inside non-overlapping windows, queries from the primary map.

    Q = Conv1D_q(W(F_p)), K = Conv1D_k(W(F_a)), V = Conv1D_v(W(F_a)) (eqs. 1-3), softmax(QᵀK/√d)Vᵀ with
    d = channels (eq. 4), then Conv1D_o and the window reverse W⁻¹ (eq. 5). A Conv1D of kernel size 1 over the token
    axis is a per-token linear map of the channels, so the projections are ``nn.Linear`` on channels-last tokens:
    the same operation without the (B·nWindows, C, tokens) transposes a Conv1d needs around the attention.
    Windows hold window_size voxels per axis; along an axis shorter than that the window is the whole axis.
    Where a size is not divisible by the window, the maps are zero-padded at the end, the padded key tokens are
    masked out of the softmax (so padding changes no output of a real voxel) and the output is cropped back.
    """

    def __init__(self, channels: int, dim: int, window_size: int):
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.query = nn.Linear(channels, channels)
        self.key = nn.Linear(channels, channels)
        self.value = nn.Linear(channels, channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, primary: torch.Tensor, auxiliary: torch.Tensor) -> torch.Tensor:
        if primary.shape != auxiliary.shape or primary.ndim != self.dim + 2:
            raise ValueError(f"CMA needs two (B, C, *spatial) maps of one shape with {self.dim} spatial axes, "
                             f"got {tuple(primary.shape)} and {tuple(auxiliary.shape)}")
        batch, spatial = primary.shape[0], list(primary.shape[2:])
        window = [min(self.window_size, n) for n in spatial]
        padded = [math.ceil(n / w) * w for n, w in zip(spatial, window)]
        real_keys = None
        if padded != spatial:
            pad = [amount for n, p in zip(reversed(spatial), reversed(padded)) for amount in (0, p - n)]
            primary, auxiliary = F.pad(primary, pad), F.pad(auxiliary, pad)
            real = F.pad(primary.new_ones(1, 1, *spatial, dtype=torch.bool), pad)
            real_keys = _window_partition(real, window).transpose(1, 2).repeat(batch, 1, 1)[:, None]
        auxiliary_tokens = _window_partition(auxiliary, window)
        # one head: (B·nWindows, 1, tokens, C), the 4-D layout torch's fused attention kernels are written for
        attended = F.scaled_dot_product_attention(self.query(_window_partition(primary, window))[:, None],
                                                  self.key(auxiliary_tokens)[:, None],
                                                  self.value(auxiliary_tokens)[:, None], attn_mask=real_keys)
        out = _window_reverse(self.out(attended[:, 0]), batch, padded, window)
        return out if real_keys is None else out[(..., *(slice(0, n) for n in spatial))]


def _as_matrix(matrix: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A rotation matrix (tensor on any device, or array) as a CPU tensor."""
    return torch.as_tensor(matrix).detach().cpu()


def rotate_by_resampling(x: torch.Tensor, matrix: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Rotate a (B, C, *spatial) map on its own grid by (bi/tri)linear resampling in normalised coordinates.

    The output at normalised position y ∈ [-1, 1]^dim (array-axis order, align_corners=True) takes the input at
    matrixᵀ·y, zeros outside. This is the convention of :func:`nnunet_rl.rotations.rotate_array`, on a grid that
    keeps its shape also when it is anisotropic (a (4, 8, 6) map stays (4, 8, 6)); on a cube it equals that
    function up to float rounding. affine_grid and grid_sample order coordinates last axis first, hence the flips.
    """
    dim = x.ndim - 2
    inverse = _as_matrix(matrix).to(x.dtype).T.flip(0, 1)
    theta = copy_to_device(torch.cat((inverse, inverse.new_zeros(dim, 1)), dim=1), x.device)
    grid = F.affine_grid(theta.expand(x.shape[0], dim, dim + 1), list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def rotate_feature_map(x: torch.Tensor, matrix: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Rotate a (B, C, *spatial) map on its own grid (the convention of :func:`rotate_by_resampling`).

    When the rotation maps the grid onto itself (always on a cube; on a (4, 8, 8) map for turns in the 8x8 plane)
    it is an exact, differentiable permute-and-flip, equal to ``rotate_array``; otherwise it is resampled.
    """
    matrix = _as_matrix(matrix)
    columns = matrix.abs().argmax(dim=1).tolist()
    spatial = x.shape[2:]
    if any(spatial[i] != spatial[j] for i, j in enumerate(columns)):
        return rotate_by_resampling(x, matrix)
    flipped = [2 + i for i, j in enumerate(columns) if matrix[i, j] < 0]
    return x.permute(0, 1, *(2 + j for j in columns)).flip(flipped)


class PoseAlign(nn.Module):
    """PoseAlign, eq. 6: the policy π = softmax(θ/τ) over the rotations of the cube, and their application.

    ``theta`` (24 in 3D, 4 in 2D, zero-initialised: uniform π) is the PPO actor. The caller chooses the actions:
    :meth:`sample` during the RL phase, :meth:`deterministic_action` after it and at inference; :meth:`forward`
    averages the auxiliary map over the chosen rotations (the paper's mean over K_sel sampled rotations).
    ``min_greedy_probability``: the margin rule of :meth:`deterministic_action` (0: always the most probable).
    """

    def __init__(self, dim: int, k_sel: int, temperature: float, min_greedy_probability: float = 0.0):
        super().__init__()
        rotations = cube_rotations(dim)
        verify_rotation_group(rotations)
        self.k_sel = k_sel
        self.temperature = temperature
        self.min_greedy_probability = min_greedy_probability
        self.theta = nn.Parameter(torch.zeros(len(rotations)))
        self.rotations = torch.as_tensor(np.stack(rotations), dtype=torch.long)  # on the CPU: read without a sync
        self._cpu_theta: tuple[int, torch.Tensor] | None = None  # (θ's version, θ on the CPU)

    def probabilities(self) -> torch.Tensor:
        """π = softmax(θ/τ) over the rotation indices."""
        return torch.softmax(self.theta / self.temperature, dim=0)

    def _theta_on_cpu(self) -> torch.Tensor:
        """θ as a CPU tensor, cached until θ changes (optimizer steps and state loading bump its version): actions
        are chosen on the CPU, and reading θ from the GPU every step would wait for the device."""
        if self._cpu_theta is None or self._cpu_theta[0] != self.theta._version:
            self._cpu_theta = (self.theta._version, self.theta.detach().cpu())
        return self._cpu_theta[1]

    @torch.no_grad()
    def sample(self, generator: torch.Generator) -> torch.Tensor:
        """k_sel rotation indices drawn by π with replacement, a CPU LongTensor (k_sel,).

        Actions live on the CPU (drawn with a CPU generator, so a seed gives the same rotations on every device):
        the forward pass reads them without waiting for the GPU.
        """
        probabilities = torch.softmax(self._theta_on_cpu() / self.temperature, dim=0)
        return torch.multinomial(probabilities, self.k_sel, replacement=True, generator=generator)

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        """log π of each row of actions (N, k_sel): the sum of the log-probabilities of its k_sel draws, (N,)."""
        return torch.log_softmax(self.theta / self.temperature, dim=0)[actions].sum(dim=-1)

    def entropy(self) -> torch.Tensor:
        """The entropy of π (one draw), a scalar."""
        log_pi = torch.log_softmax(self.theta / self.temperature, dim=0)
        return -(log_pi.exp() * log_pi).sum()

    def greedy_action(self) -> torch.Tensor:
        """argmax π (= argmax θ) as a CPU LongTensor (1,); ties go to the lowest index: the identity at
        initialisation. Deterministic, so predictions are reproducible."""
        return torch.argmax(self._theta_on_cpu()).reshape(1)

    def deterministic_action(self) -> torch.Tensor:
        """The rotation applied after the RL phase and at inference, a CPU LongTensor (1,): the greedy one where π
        puts at least ``min_greedy_probability`` on it, else the identity. A policy that has not settled (on
        co-registered data, or when learning fell short) then never applies a rotation chosen by noise."""
        greedy = self.greedy_action()
        probability = torch.softmax(self._theta_on_cpu() / self.temperature, dim=0)[greedy]
        return greedy if float(probability) >= self.min_greedy_probability else torch.zeros(1, dtype=torch.long)

    def _turn(self, auxiliary: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        rotated = [auxiliary if a == 0 else rotate_feature_map(auxiliary, self.rotations[a])
                   for a in actions.tolist()]
        return rotated[0] if len(rotated) == 1 else torch.stack(rotated).mean(dim=0)

    def forward(self, auxiliary: torch.Tensor, actions: torch.Tensor,
                mirroring: Mirroring | None = None) -> torch.Tensor:
        """The mean over the rotation indices in actions (1-D) of the rotated map; index 0 (identity) is free.

        With ``mirroring``, the samples of each mirrored group are turned by the conjugated rotations (F·R·F), so the
        actions mean the same re-alignment on every sample (:mod:`nnunet_rl.mirroring`).
        """
        if mirroring is None or not mirroring.changes(actions):
            return self._turn(auxiliary, actions)
        return torch.cat([self._turn(auxiliary[group.start:group.stop], mirroring.conjugated(actions, group.axes))
                          for group in mirroring.groups])


def activity_map(features: torch.Tensor) -> torch.Tensor:
    """The L2 norm over channels at each voxel, (B, C, *spatial) -> (B, 1, *spatial). A rotation of the grid
    commutes with it: the activity map of a rotated map is the rotated activity map."""
    return features.norm(dim=1, keepdim=True)


def activity_correlation(activity_p: torch.Tensor, activity_a: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """S_similarity of eqs. 8-9 from two activity maps (B, 1, *spatial) (:func:`activity_map`): their Pearson
    correlation over voxels, one value per sample (B,) in [-1, 1].

    The paper does not define S_similarity. We take the correlation of the two feature maps' activity maps, the L2
    norm over channels at each voxel. The two branches' encoders have no channel correspondence, so the measure must
    not depend on channel order, and CT and MRI may show a structure with opposite contrast, so it must not depend on
    the sign of a feature; the activity map is invariant to both, and the correlation to the scale of either map.
    A constant map (zero variance) gives 0, not NaN (eps guards the denominator).
    """
    activity_p, activity_a = activity_p.flatten(1), activity_a.flatten(1)
    centred_p = activity_p - activity_p.mean(dim=1, keepdim=True)
    centred_a = activity_a - activity_a.mean(dim=1, keepdim=True)
    spread = centred_p.square().sum(dim=1).sqrt() * centred_a.square().sum(dim=1).sqrt()
    return (centred_p * centred_a).sum(dim=1) / spread.clamp_min(eps)


class RLXAlign(nn.Module):
    """RL-XAlign for one encoder stage: PoseAlign, then CMA, then the weighted fusion of eq. 7.

    The paper's text runs CMA before PoseAlign. We rotate the auxiliary map first, so that CMA's windows compare
    content that is already aligned: an attention local to a window cannot undo a rotation of the whole map.
    ``forward`` returns ``(fused, aligned)``: fused = λ·CMA(F_p, aligned) + (1 − λ)·F_p (eq. 7, λ =
    fusion_weight, 0.3 in the paper) and the rotated auxiliary map ``aligned``, on the primary's grid, for
    S_similarity and the alignment loss. With use_cma=False the attended map is ``aligned`` itself
    (the paper's "w/o CMA" ablation).
    """

    def __init__(self, channels: int, dim: int, window_size: int, k_sel: int, temperature: float,
                 fusion_weight: float = 0.3, use_cma: bool = True, min_greedy_probability: float = 0.0):
        super().__init__()
        self.channels, self.fusion_weight = channels, fusion_weight
        self.pose = PoseAlign(dim, k_sel=k_sel, temperature=temperature, min_greedy_probability=min_greedy_probability)
        self.cma = CrossModalAttention(channels, dim, window_size) if use_cma else None

    def forward(self, primary: torch.Tensor, auxiliary: torch.Tensor, actions: torch.Tensor,
                mirroring: Mirroring | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        aligned = self.pose(auxiliary, actions, mirroring)
        attended = self.cma(primary, aligned) if self.cma is not None else aligned
        return torch.lerp(primary, attended, self.fusion_weight), aligned

    def compute_conv_feature_map_size(self, input_size) -> int:
        """Elements this module stores for the backward pass on a map of spatial size ``input_size``: the turned
        auxiliary map and the fused output; with CMA also both maps' window tokens, Q, K, V, the attention output, its
        projection and the reversed windows (C per voxel each) and the attention weights (window_size^dim per voxel).
        """
        voxels = int(np.prod(input_size, dtype=np.int64))
        channels = self.channels
        if self.cma is None:
            return 2 * channels * voxels
        window = int(np.prod([min(self.cma.window_size, n) for n in input_size], dtype=np.int64))
        return 10 * channels * voxels + window * voxels
