"""Closed forms of diffusion for Gaussian data ``N(m, S)``: the exact denoiser, eps, score and probability-flow map.

With ``S = U diag(l) U^T`` and ``a = alpha_bar_t``, the forward process keeps the data Gaussian,
``x_t ~ N(sqrt(a) m, a S + (1 - a) I)``, so every quantity a network learns has a closed form:

- ``E[x_0 | x_t] = m + U diag(sqrt(a) l / (a l + 1 - a)) U^T (x_t - sqrt(a) m)`` (the best linear denoiser of any
  data with this mean and covariance);
- ``eps(x_t) = (x_t - sqrt(a) E[x_0 | x_t]) / sqrt(1 - a)``;
- the VE score at noise level sigma, ``-(S + sigma^2 I)^-1 (x - m)``;
- the probability-flow ODE from ``a`` to ``a'``: each eigen-direction of ``x - sqrt(a) m`` scales by
  ``sqrt((a' l + 1 - a') / (a l + 1 - a))``.

Fitted to real data (:meth:`GaussianData.fit`) these are what a model that learned only the first two moments does:
the baselines a trained network must beat, and near-exact at high noise, where the data's structure is a few
percent of x_t (Wang & Vastola 2023, "The hidden linear structure in score-based models"). Computed in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _column(value: torch.Tensor | float, batch: int) -> torch.Tensor:
    """``value`` (a float or (B,)) as a float64 column (B, 1)."""
    return torch.as_tensor(value, dtype=torch.float64).reshape(-1, 1).expand(batch, 1)


@dataclass(frozen=True)
class GaussianData:
    """``N(mean, basis diag(eigenvalues) basis^T)`` over flattened data of D values: mean (D,), eigenvalues (D,),
    basis (D, D), float64."""

    mean: torch.Tensor
    eigenvalues: torch.Tensor
    basis: torch.Tensor

    @classmethod
    def fit(cls, data: torch.Tensor) -> GaussianData:
        """The Gaussian with the mean and covariance of ``data`` (N, ...); N > 1."""
        flat = data.reshape(len(data), -1).double()
        eigenvalues, basis = torch.linalg.eigh(torch.cov(flat.T).reshape(flat.shape[1], flat.shape[1]))
        return cls(flat.mean(0), eigenvalues.clamp(min=0), basis)

    @classmethod
    def isotropic(cls, mean: torch.Tensor, std: float) -> GaussianData:
        """``N(mean, std^2 I)`` for mean (D,)."""
        mean = mean.double().flatten()
        return cls(mean, torch.full_like(mean, std**2), torch.eye(len(mean), dtype=torch.float64))

    def _centred(self, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """``x`` (B, ...) flattened to (B, D) in float64, minus ``shift * mean`` (shift (B, 1)), in the eigenbasis."""
        return (x.reshape(len(x), -1).double() - shift * self.mean) @ self.basis

    def _x0_flat(self, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        """``E[x_0 | x_t]`` as (B, D) float64 for x_t (B, ...), ``alpha_bar`` a (B, 1) column. Per eigendirection
        of variance lambda:
        ``E[x_0 | x_t] = m + sqrt(alpha_bar) lambda / (alpha_bar lambda + 1 - alpha_bar) (x_t - sqrt(alpha_bar) m)``."""
        gain = alpha_bar.sqrt() * self.eigenvalues / (alpha_bar * self.eigenvalues + 1 - alpha_bar)
        return self.mean + (self._centred(x_t, alpha_bar.sqrt()) * gain) @ self.basis.T

    def x0_mean(self, x_t: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
        """``E[x_0 | x_t]`` for x_t (B, ...) at ``alpha_bar`` (a float or (B,)); the shape and dtype of x_t."""
        return self._x0_flat(x_t, _column(alpha_bar, len(x_t))).to(x_t.dtype).reshape(x_t.shape)

    def eps(self, x_t: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
        """The exact eps-prediction ``(x_t - sqrt(a) E[x_0 | x_t]) / sqrt(1 - a)``; x_t (B, ...), a float or (B,);
        the shape and dtype of x_t."""
        column = _column(alpha_bar, len(x_t))
        out = (x_t.reshape(len(x_t), -1).double() - column.sqrt() * self._x0_flat(x_t, column)) / (1 - column).sqrt()
        return out.to(x_t.dtype).reshape(x_t.shape)

    def score(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """The VE score ``-(S + sigma^2 I)^-1 (x - m)`` of the data blurred by N(0, sigma^2 I); x (B, ...), sigma a
        float or (B,); the shape and dtype of x."""
        variance = self.eigenvalues + _column(sigma, len(x)) ** 2
        out = -((self._centred(x, _column(1.0, len(x))) / variance) @ self.basis.T)
        return out.to(x.dtype).reshape(x.shape)

    def flow(self, x: torch.Tensor, alpha_bar_from: float, alpha_bar_to: float) -> torch.Tensor:
        """The probability-flow ODE solved exactly from ``alpha_bar_from`` to ``alpha_bar_to``; x (B, ...) -> the
        shape and dtype of x."""
        # per eigendirection x_t - sqrt(alpha_bar) m scales as the marginal's std sqrt(alpha_bar lambda + 1 - alpha_bar)
        start, end = _column(alpha_bar_from, len(x)), _column(alpha_bar_to, len(x))
        gain = ((end * self.eigenvalues + 1 - end) / (start * self.eigenvalues + 1 - start)).sqrt()
        out = end.sqrt() * self.mean + (self._centred(x, start.sqrt()) * gain) @ self.basis.T
        return out.to(x.dtype).reshape(x.shape)
