"""ℓp batch normalization: fix the mean as BN does, but divide by an average ℓp norm instead of the standard deviation.

Santurkar et al. (2018, Section 3.3) ask whether BN is the only way to smooth the loss landscape. They study schemes that
"fix the first order moment of the activations, as BatchNorm does, and then normalize them by the average of their
p-norm (before shifting the mean), for p = 1, 2, ∞". Per feature j, over the m values of a batch::

    mu_j    = mean_i x_ij                                     the first moment, fixed as in BN
    s_j     = ( mean_i |x_ij|^p )^(1/p)     (p = 1, 2)         the average p-norm, of x *before* the mean is shifted
            = max_i |x_ij|                  (p = inf)
    y_ij    = gamma_j * (x_ij - mu_j) / s_j + beta_j

Read literally, "(before shifting the mean)" says that s_j is taken over the raw activations, and that is the default
here (``centered_norm=False``). With ``centered_norm=True`` the norm is taken over the centred activations x - mu
instead; then p = 2 is exactly BN's standard deviation, which is why the literal reading is the one that makes ℓ2 a
scheme of its own. Unlike BN's, these outputs have neither unit variance nor a fixed shape: the variance is
(sigma / s)^2 and changes whenever the mean does.

The layers mirror ``torch.nn.BatchNorm1d``: parameters ``weight`` (gamma) and ``bias`` (beta), buffers
``running_mean``, ``running_norm`` (the running average of s, the analogue of BN's ``running_var``) and
``num_batches_tracked``; ``momentum`` weights the new batch, ``None`` gives a cumulative average. In eval mode
y = gamma * (x - running_mean) / running_norm + beta. The backward pass is autograd's (the ℓ∞ gradient flows through
the arg-max entry of each feature).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from bnnotes._core import RunningStatsNorm, check_nonnegative_eps, ema_

__all__ = ["lp_batch_norm", "lp_batch_stats", "LpBatchNorm1d"]


def _check_p(p: Any) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"p must be 1, 2 or math.inf, got {p!r} of type {type(p).__name__}")
    if p not in (1, 2, math.inf):
        raise ValueError(f"p must be 1, 2 or math.inf (the ℓ1, ℓ2 and ℓ∞ schemes of Santurkar et al.), got {p!r}")
    return float(p)


def lp_batch_stats(x: Tensor, p: float, eps: float = 1e-5, centered_norm: bool = False) -> tuple[Tensor, Tensor]:
    """The batch mean and the average ℓp norm of each feature of x (N, C): returns (mu, s), both (C,).

    For p = 1, 2: s = (mean_i |v_i|^p + eps)^(1/p); for p = inf: s = max_i |v_i| + eps, where v = x (the paper's
    reading, default) or v = x - mu (``centered_norm=True``; then p = 2 gives sqrt(biased var + eps), BN's divisor).

    >>> x = torch.tensor([[1.0], [3.0]])
    >>> mu, s = lp_batch_stats(x, p=math.inf, eps=0.0)
    >>> mu.item(), s.item()
    (2.0, 3.0)
    """
    p = _check_p(p)
    mu = x.mean(dim=0)
    v = (x - mu) if centered_norm else x
    if math.isinf(p):
        s = v.abs().amax(dim=0) + eps
    else:
        s = (v.abs().pow(p).mean(dim=0) + eps).pow(1.0 / p)
    return mu, s


def lp_batch_norm(
    x: Tensor,
    p: float,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    centered_norm: bool = False,
) -> Tensor:
    """Training-mode ℓp batch normalization of x (N, C) with batch statistics; returns y with x's shape.

    y = weight * (x - mu) / s + bias with (mu, s) from `lp_batch_stats`. Differentiable by autograd.

    >>> y = lp_batch_norm(torch.tensor([[1.0], [3.0]]), p=1, eps=0.0)
    >>> y.flatten().tolist()
    [-0.5, 0.5]
    """
    mu, s = lp_batch_stats(x, p, eps, centered_norm)
    y = (x - mu) / s
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


class LpBatchNorm1d(RunningStatsNorm):
    """ℓp batch normalization for (N, C) inputs, with running statistics for eval mode, like ``BatchNorm1d``.

    num_features: C. p: 1, 2 or ``math.inf``. eps: see `lp_batch_stats`. momentum: the new batch's weight in
    ``running = (1 - momentum) * running + momentum * batch`` (``None``: cumulative average). affine: learn gamma, beta.
    centered_norm: take the norm over x - mu instead of x (see the module docstring). State and input checks are
    `bnnotes._core.RunningStatsNorm`'s, with buffers ``running_mean`` and ``running_norm``.

    >>> layer = LpBatchNorm1d(4, p=1)
    >>> layer(torch.randn(8, 4)).shape
    torch.Size([8, 4])
    """

    running_stats = {"running_mean": 0.0, "running_norm": 1.0}
    input_ranks = (2,)
    input_layout = "(N, C)"

    def __init__(
        self,
        num_features: int,
        p: float,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        centered_norm: bool = False,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats=True, device=device, dtype=dtype)
        check_nonnegative_eps(eps)  # eps = 0 is allowed, as in the NumPy references, for exact values
        self.p = _check_p(p)
        self.centered_norm = centered_norm

    def forward(self, input: Tensor) -> Tensor:
        self._check_forward_input(input)
        if not self.training:
            y = (input - self.running_mean) / self.running_norm
            return y * self.weight + self.bias if self.affine else y
        if input.shape[0] < 2:
            raise ValueError(f"training-mode ℓp batch norm needs more than 1 example, got input of shape {tuple(input.shape)}")
        mu, s = lp_batch_stats(input, self.p, self.eps, self.centered_norm)
        with torch.no_grad():
            momentum = self._momentum()
            ema_(self.running_mean, mu.detach(), momentum)
            ema_(self.running_norm, s.detach(), momentum)
        y = (input - mu) / s
        return y * self.weight + self.bias if self.affine else y

    def extra_repr(self) -> str:
        p = "inf" if math.isinf(self.p) else int(self.p)
        return (
            f"{self.num_features}, p={p}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"centered_norm={self.centered_norm}"
        )
