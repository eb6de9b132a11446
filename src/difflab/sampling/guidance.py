"""Guidance: eps-model wrappers that steer any eps-based sampler towards a class.

Both wrappers return an object called as ``model(x_t, t) -> eps_hat``, so DDPM, DDIM and the other
samplers use them unchanged. For a learned-variance model, whose output is ``[eps, v]`` (twice the input's
channels), only eps is guided; v is the conditional model's (as in GLIDE).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from difflab.diffusion.schedule import NoiseSchedule
from difflab.diffusion.vlb import split_output
from difflab.sampling.common import EpsModel


class ClassifierGuidance:
    """Classifier guidance (Dhariwal & Nichol 2021, Algorithm 2):

    ``eps_hat = eps_theta(x_t, t) - s sqrt(1 - alpha_bar_t) grad_x log f_phi(y | x_t, t)``.

    ``grad_x log f_phi`` is the gradient of the log-softmax of the classifier's logits, taken with
    autograd enabled even inside a ``no_grad`` sampler. ``scale`` is ``s`` (1 is the reference);
    ``labels`` is an int or a (B,) tensor. Used in DDPM as well as DDIM, since ``eps_hat`` is the eps
    of the guided score ``grad log p(x_t) + s grad log p(y | x_t)``.
    """

    needs_grad = True

    def __init__(
        self,
        model: EpsModel,
        classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        schedule: NoiseSchedule,
        labels: int | torch.Tensor,
        scale: float = 1.0,
    ) -> None:
        self.model = model
        self.classifier = classifier
        self.schedule = schedule
        self.labels = labels
        self.scale = scale

    def log_prob_grad(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``grad_x log f_phi(y | x_t, t)``: x (B, ...), t (B,) -> (B, ...), the shape of x."""
        labels = self.labels
        if not isinstance(labels, torch.Tensor):
            labels = torch.full((x.shape[0],), int(labels), device=x.device, dtype=torch.long)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = torch.log_softmax(self.classifier(x_in, t), dim=1)
            selected = log_probs.gather(1, labels.to(x.device)[:, None]).sum()
            (grad,) = torch.autograd.grad(selected, x_in)
        return grad

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (B, ...), t: (B,) -> the guided eps (B, ...): ``eps - scale sigma_t grad log p(y | x_t)`` (Dhariwal &
        Nichol 2021, Algorithm 2); a learned variance's extra channels pass through unchanged."""
        output = self.model(x, t)
        if self.scale == 0:
            return output
        eps, values = split_output(output, x)
        sigma = self.schedule.sigma(t).reshape((-1,) + (1,) * (x.ndim - 1))
        eps_hat = eps - self.scale * sigma * self.log_prob_grad(x, t)
        return eps_hat if values is None else torch.cat([eps_hat, values], dim=1)


def cfg_combine(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022), difflab's convention; both eps (B, ...) -> (B, ...):

    ``eps_hat = eps_u + w (eps_c - eps_u)``: ``w = 0`` is unconditional, ``w = 1`` purely conditional,
    ``w > 1`` extrapolates. The paper's form ``(1 + w') eps_c - w' eps_u`` is the same with ``w = 1 + w'``.
    """
    return eps_uncond + w * (eps_cond - eps_uncond)


class ClassifierFreeGuidance:
    """``model(x_t, t, y)`` with a null label, combined by :func:`cfg_combine` in one batched call."""

    def __init__(
        self, model: Callable[..., torch.Tensor], labels: torch.Tensor | int, null_label: int, w: float
    ) -> None:
        self.model = model
        self.labels = labels
        self.null_label = null_label
        self.w = w

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: (B, ...), t: (B,) -> the guided eps (B, ...); ``w`` = 0 or 1 cost one network call, others one call
        on the doubled batch (2B, ...)."""
        labels = self.labels
        if not isinstance(labels, torch.Tensor):
            labels = torch.full((x.shape[0],), int(labels), device=x.device, dtype=torch.long)
        labels = labels.to(x.device)
        if self.w == 1:
            return self.model(x, t, labels)
        null = torch.full_like(labels, self.null_label)
        if self.w == 0:
            return self.model(x, t, null)
        output = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
        cond, uncond = output.chunk(2)
        eps_cond, values = split_output(cond, x)
        eps_uncond, _ = split_output(uncond, x)
        eps_hat = cfg_combine(eps_uncond, eps_cond, self.w)
        return eps_hat if values is None else torch.cat([eps_hat, values], dim=1)
