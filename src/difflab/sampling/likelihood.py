"""Exact log-likelihood of a diffusion model through its probability-flow ODE (Song et al. 2021, sec. 4.3
and appendix D.2).

The probability-flow ODE of the VP SDE ``dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw`` is

    dx/dt = f~(x, t) = -1/2 beta(t) (x + s(x, t)),   s = grad_x log p_t = -eps(x, t) / sqrt(1 - alpha_bar(t)),

and along its solution the log-density changes by the instantaneous change of variables
``d log p_t(x(t)) / dt = -div f~(x(t), t)``. Integrating x and ``int div f~ dt`` jointly from ``t_min`` to 1
gives ``log p_{t_min}(x) = log N(x(1); 0, I) + int_{t_min}^1 div f~(x(t), t) dt``.

Continuous-time convention (stated in every result). Continuous time ``tau in [0, 1]`` maps to the
fractional timestep ``u = tau (T - 1)`` of the discrete schedule (Song et al.'s ``labels = t (N - 1)`` for
discrete VP models). The noise level is the model's continuous schedule
(:meth:`~difflab.sampling.wrappers.DiffusionModel.t_to_sigma`, log-sigma linear between steps):
``alpha_bar(tau) = 1 / (1 + sigma(u)^2)``, and ``beta(tau) = -d log alpha_bar / d tau``. So the ODE's
marginals at integer ``u`` are exactly the discrete schedule's, ``beta`` interpolates ``T beta_t``, and the
density returned is that of the model's least-noisy marginal ``alpha_bar(t_min) ~ alpha_bar_0``
(``sqrt(1 - alpha_bar_0) = 0.01`` for DDPM's linear schedule), i.e. of the data convolved with that noise.
The prior at ``tau = 1`` is ``N(0, I)``, the distribution every difflab sampler starts from.

Divergence: exact (one backward pass per dimension; the default for D <= 16, e.g. 2-D points), or
Hutchinson's estimator ``E_v[v^T (d eps / dx) v]`` with one probe ``v`` (Rademacher or Gaussian) drawn per
sample and held fixed along the trajectory, as in Grathwohl et al. 2019 / Song et al. (images).

Integration: ``scipy.integrate.solve_ivp`` (RK45 by default) in float64 with ``rtol = atol = 1e-5``.

Images: :func:`bits_per_dim` converts nats to bits per dimension of 8-bit data with uniform
dequantisation, for data scaled as ``x = (k + u) / 127.5 - 1`` (k in 0..255, u ~ U[0, 1)):
``bpd = nll / (D ln 2) + log2(127.5)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.integrate import solve_ivp

from difflab.diffusion.schedule import NoiseSchedule
from difflab.errors import ConfigError
from difflab.sampling.wrappers import DiffusionModel, as_diffusion_model

DIVERGENCES = ("auto", "exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
EXACT_MAX_DIMS = 16


@dataclass(frozen=True)
class LikelihoodSettings:
    """How the likelihood was computed (written next to every result)."""

    t_min: float = 1e-5
    rtol: float = 1e-5
    atol: float = 1e-5
    method: str = "RK45"
    divergence: str = "auto"
    probe: str = "rademacher"
    convention: str = (
        "VP probability-flow ODE; tau in [t_min, 1] -> timestep u = tau (T-1); alpha_bar(tau) = 1/(1+sigma(u)^2) "
        "with log sigma linear between the discrete steps; beta = -d log alpha_bar / d tau; prior N(0, I) at tau=1"
    )

    def __post_init__(self) -> None:
        if not 0 <= self.t_min < 1:
            raise ConfigError(f"t_min must lie in [0, 1), got {self.t_min}")
        if not (self.rtol > 0 and self.atol > 0):  # NaN fails both
            raise ConfigError("rtol and atol must be > 0")
        if self.divergence not in DIVERGENCES:
            raise ConfigError(f"divergence must be one of {', '.join(DIVERGENCES)}, got {self.divergence!r}")
        if self.probe not in PROBES:
            raise ConfigError(f"probe must be one of {', '.join(PROBES)}, got {self.probe!r}")


@dataclass
class LikelihoodResult:
    """Per-sample results (tensors of shape (B,), float64) and how they were obtained."""

    log_likelihood: torch.Tensor  # log p_{t_min}(x), nats
    prior_log_prob: torch.Tensor  # log N(x(1); 0, I)
    delta_log_prob: torch.Tensor  # int_{t_min}^1 div f~ dt
    dims: int
    nfe: int  # right-hand-side evaluations of the ODE solver (each one network call, plus backward passes)
    divergence: str
    settings: LikelihoodSettings

    @property
    def nll(self) -> torch.Tensor:
        """Negative log-likelihood in nats per sample, (B,)."""
        return -self.log_likelihood

    def summary(self) -> dict:
        return {
            **asdict(self.settings),
            "n": len(self.log_likelihood),
            "dims": self.dims,
            "nll_nats": float(self.nll.mean()),
            "nll_nats_per_dim": float(self.nll.mean()) / self.dims,
            "nll_nats_std": float(self.nll.std()) if len(self.nll) > 1 else 0.0,
            "nfe": self.nfe,
            "divergence": self.divergence,
        }


def bits_per_dim(nll_nats: torch.Tensor | float, dims: int, bin_width: float = 1 / 127.5) -> torch.Tensor | float:
    """Bits per dimension of 8-bit data from the NLL (nats) of its dequantised, rescaled version; ``nll_nats`` of any
    shape (one NLL per item of D = ``dims`` values), returned in that shape.

    With ``x = a (k + u) + b`` (bin width ``a`` in x; ``a = 1/127.5`` for ``x = (k + u)/127.5 - 1``), the
    density of the dequantised integers is ``p_x(x) a^D``, so
    ``bpd = (nll_x - D log a) / (D ln 2) = nll_x / (D ln 2) - log2(a)``; by Jensen this upper-bounds the
    discrete model's bits per dimension. (For ``a = 2/256``, Song et al.'s scaling, ``-log2 a = 7``.)
    """
    return nll_nats / (dims * math.log(2)) - math.log2(bin_width)


def dequantize(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform dequantisation of 8-bit images (any shape, integer values 0..255) to ``(k + u)/127.5 - 1``."""
    k = images.to(torch.float64)
    if k.min() < 0 or k.max() > 255:
        raise ConfigError("dequantize expects 8-bit values in 0..255")
    u = torch.rand(k.shape, generator=generator, dtype=torch.float64).to(k.device)  # CPU draws: same on any device
    return (k + u) / 127.5 - 1


def _probe(shape: tuple[int, ...], kind: str, generator: torch.Generator | None, dtype) -> torch.Tensor:
    """Hutchinson's probe ``v`` (E[v v^T] = I) of ``shape`` (B, ...) in ``dtype`` on the CPU: ``gaussian`` N(0, I) or
    else Rademacher (+-1 with equal probability)."""
    if kind == "gaussian":
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    return torch.randint(0, 2, shape, generator=generator).to(dtype) * 2 - 1


def eps_and_divergence(
    model: DiffusionModel, x: torch.Tensor, t: torch.Tensor, probe: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``eps(x, t)`` (B, ...) and ``div_x eps`` (B,) for x (B, ...), t (B,): exact when ``probe`` is None (one
    backward pass per dimension), else Hutchinson's ``v^T (d eps / dx) v`` for the probe ``v`` (shape of x)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        eps = model.eps(x, t)
        if probe is not None:
            (vjp,) = torch.autograd.grad((eps * probe).sum(), x)
            return eps.detach(), (vjp * probe).reshape(len(x), -1).sum(1)
        flat_eps = eps.reshape(len(x), -1)
        dims = flat_eps.shape[1]
        divergence = torch.zeros(len(x), dtype=x.dtype, device=x.device)
        for i in range(dims):
            (grad,) = torch.autograd.grad(flat_eps[:, i].sum(), x, retain_graph=i + 1 < dims)
            divergence = divergence + grad.reshape(len(x), -1)[:, i]
    return eps.detach(), divergence.detach()


def probability_flow_likelihood(
    model: DiffusionModel | object,
    schedule: NoiseSchedule,
    x: torch.Tensor,
    *,
    settings: LikelihoodSettings | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> LikelihoodResult:
    """``log p(x)`` of the model at ``t_min`` for a batch x: (B, D) points or (B, C, H, W) images.

    One ODE system holds the whole batch (one adaptive step size for all samples); split large data
    sets into batches. ``dtype`` is the precision of the network calls (the integration runs in float64).
    """
    settings = settings or LikelihoodSettings()
    net = as_diffusion_model(model, schedule)
    if x.ndim < 2:
        raise ConfigError(f"likelihood needs a batch of shape (B, ...), got {tuple(x.shape)}")
    shape = tuple(x.shape)
    batch, dims = shape[0], int(np.prod(shape[1:]))
    mode = settings.divergence
    if mode == "auto":
        mode = "exact" if dims <= EXACT_MAX_DIMS else "hutchinson"
    probe = _probe(shape, settings.probe, generator, dtype).to(device) if mode == "hutchinson" else None
    # The VP ODE dx/dtau = -beta/2 (x + s) integrated in the variable r = log sigma_ve(tau): since
    # beta dtau = -d log alpha_bar = d log(1 + sigma^2) = 2 sigma^2 / (1 + sigma^2) dr, it reads
    # dx/dr = -k (x + s) with k = sigma^2 / (1 + sigma^2). Same solution, but smooth in r where beta(tau)
    # jumps at every discrete step (log sigma is piecewise linear in tau), which RK45 handles badly.
    r_start = math.log(float(net.t_to_sigma(settings.t_min * (net.num_timesteps - 1))))
    r_end = math.log(net.sigma_max)
    calls = 0

    def rhs(r: float, state: np.ndarray) -> np.ndarray:
        nonlocal calls
        calls += 1
        x_t = torch.from_numpy(state[: batch * dims]).reshape(shape).to(device=device, dtype=dtype)
        sigma2 = math.exp(2 * r)
        k = sigma2 / (1 + sigma2)
        sigma_vp = math.sqrt(k)  # sqrt(1 - alpha_bar)
        t = net.sigma_to_t(math.exp(r)).expand(batch).to(device)
        eps, div_eps = eps_and_divergence(net, x_t, t, probe)
        # f~ = -k (x + s), s = -eps / sigma_vp; div f~ = -k (D - div eps / sigma_vp)
        drift = -k * (x_t - eps / sigma_vp)
        divergence = -k * (dims - div_eps / sigma_vp)
        return np.concatenate([drift.reshape(-1).double().cpu().numpy(), divergence.double().cpu().numpy()])

    initial = np.concatenate([x.detach().double().cpu().reshape(-1).numpy(), np.zeros(batch)])
    solution = solve_ivp(rhs, (r_start, r_end), initial, method=settings.method, rtol=settings.rtol, atol=settings.atol)
    if not solution.success:
        raise ConfigError(f"the likelihood ODE solver failed: {solution.message}")
    final = torch.from_numpy(solution.y[:, -1])
    x_1 = final[: batch * dims].reshape(batch, dims)
    delta = final[batch * dims :]
    prior = -0.5 * dims * math.log(2 * math.pi) - 0.5 * (x_1**2).sum(1)
    return LikelihoodResult(
        log_likelihood=prior + delta,
        prior_log_prob=prior,
        delta_log_prob=delta,
        dims=dims,
        nfe=calls,
        divergence=mode if mode == "exact" else f"hutchinson ({settings.probe})",
        settings=settings,
    )


def batched_likelihood(
    model: DiffusionModel | object,
    schedule: NoiseSchedule,
    x: torch.Tensor,
    *,
    batch_size: int = 1000,
    settings: LikelihoodSettings | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> LikelihoodResult:
    """:func:`probability_flow_likelihood` over ``x`` (N, ...) in batches of ``batch_size``; results concatenated
    (``nll`` (N,))."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    parts = [
        probability_flow_likelihood(
            model, schedule, x[i : i + batch_size], settings=settings, generator=generator, dtype=dtype, device=device
        )
        for i in range(0, len(x), batch_size)
    ]
    if not parts:
        raise ConfigError("likelihood needs at least one sample")
    return LikelihoodResult(
        log_likelihood=torch.cat([p.log_likelihood for p in parts]),
        prior_log_prob=torch.cat([p.prior_log_prob for p in parts]),
        delta_log_prob=torch.cat([p.delta_log_prob for p in parts]),
        dims=parts[0].dims,
        nfe=sum(p.nfe for p in parts),
        divergence=parts[0].divergence,
        settings=parts[0].settings,
    )
