"""Exact denoisers for data whose posterior mean is known in closed form: what the samplers are tested and measured
against (tests/test_samplers.py, benchmarks/bench_sampler_quality.py), and a way to check a sampler of one's own.

Each oracle is a model `oracle(z, logsnr, cond=None, cond_mask=None, **kw) -> prediction` ("eps", "v" or "x") for
z = alpha x + sigma eps, alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr), computed in fp64 and returned in z's
dtype; differentiable (reconstruction guidance goes through it). With an exact denoiser every error of a sample is
the sampler's own (discretisation, and Monte Carlo noise).

- GaussianOracle: x ~ N(mean (+ cond), Sigma), Sigma = cov_fn(T, H, W) over the flattened trailing dims (or std^2 I),
  independent over batch and channels: E[x | z] = mu + alpha Sigma (alpha^2 Sigma + sigma^2 I)^-1 (z - alpha mu),
  computed in the eigenbasis of Sigma.
- MixtureOracle: every element independently x ~ 0.5 N(-m, s^2) + 0.5 N(m, s^2) (bimodal: the error shows how a
  sampler blurs modes). Given z, component k has weight r_k proportional to N(z; alpha mu_k, alpha^2 s^2 + sigma^2)
  and posterior mean mu_k + alpha s^2 (z - alpha mu_k) / (alpha^2 s^2 + sigma^2); E[x | z] = sum_k r_k (...).
"""

from __future__ import annotations

import math

import torch


class _Oracle:
    prediction: str

    def __init__(self, prediction: str):
        self.prediction = prediction
        self.calls: list[dict] = []
        self.record = False

    def posterior(self, z, logsnr, cond=None, cond_mask=None):
        raise NotImplementedError

    @staticmethod
    def _alpha_sigma(z: torch.Tensor, logsnr: torch.Tensor):
        lam = logsnr.double().reshape(z.shape[0], *[1] * (z.dim() - 1))
        return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()

    def __call__(self, z, logsnr, cond=None, cond_mask=None, **kw):
        if self.record:
            self.calls.append(dict(z=z.detach().clone(), logsnr=logsnr.detach().clone(), cond=cond,
                                   cond_mask=cond_mask, kw=kw))
        x_hat, eps, a, s = self.posterior(z, logsnr, cond, cond_mask)
        out = {"eps": eps, "x": x_hat, "v": a * eps - s * x_hat}[self.prediction]
        return out.to(z.dtype)


class GaussianOracle(_Oracle):
    """Exact eps / v / x prediction for x ~ N(mean (+ cond per sample where cond_mask allows), Sigma)."""

    def __init__(self, prediction: str = "eps", mean: float = 0.0, std: float = 1.0, cov_fn=None):
        super().__init__(prediction)
        self.mean, self.std, self.cov_fn = mean, std, cov_fn
        self._eig: dict = {}

    def eig(self, dims: tuple[int, ...]):
        if dims not in self._eig:
            D = math.prod(dims)
            if self.cov_fn is None:
                U, d = torch.eye(D, dtype=torch.float64), torch.full((D,), self.std**2, dtype=torch.float64)
            else:
                d, U = torch.linalg.eigh(self.cov_fn(*dims).double())
            self._eig[dims] = (U, d)
        return self._eig[dims]

    def posterior(self, z, logsnr, cond=None, cond_mask=None):
        B, C = z.shape[:2]
        a, s = self._alpha_sigma(z, logsnr)
        mu = torch.tensor(self.mean, dtype=torch.float64, device=z.device)
        if cond is not None:
            shift = cond.double().reshape(B, 1, 1)
            if cond_mask is not None:
                shift = shift * cond_mask.view(B, 1, 1)
            mu = mu + shift
        if self.cov_fn is None:  # isotropic: elementwise, no basis change
            mu = mu.reshape(B, *[1] * (z.dim() - 1)) if mu.dim() else mu
            den = a * a * self.std**2 + s * s
            y = z.double() - a * mu
            return mu + a * self.std**2 / den * y, s / den * y, a, s
        U, d = (t.to(z.device) for t in self.eig(tuple(z.shape[2:])))
        a3, s3 = a.reshape(B, 1, 1), s.reshape(B, 1, 1)
        y = (z.double().reshape(B, C, -1) - a3 * mu) @ U
        den = a3 * a3 * d + s3 * s3
        x_hat = mu + (a3 * d / den * y) @ U.T
        eps = (s3 / den * y) @ U.T
        return x_hat.reshape(z.shape), eps.reshape(z.shape), a, s

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n iid draws of the isotropic data (cov_fn None), fp64."""
        return self.mean + self.std * torch.randn(n, generator=generator, dtype=torch.float64)

    def cdf(self, x: torch.Tensor) -> torch.Tensor:
        """The per-element data CDF (isotropic data)."""
        return 0.5 * torch.erfc(-(x.double() - self.mean) / (self.std * math.sqrt(2.0)))


class MixtureOracle(_Oracle):
    """Exact prediction for iid elements x ~ 0.5 N(-m, s^2) + 0.5 N(m, s^2)."""

    def __init__(self, prediction: str = "eps", m: float = 0.6, s: float = 0.1):
        super().__init__(prediction)
        self.m, self.s = float(m), float(s)

    def posterior(self, z, logsnr, cond=None, cond_mask=None):
        a, sg = self._alpha_sigma(z, logsnr)
        zd = z.double()
        var = a * a * self.s**2 + sg * sg
        gain = a * self.s**2 / var
        # log N(z; +-a m, var) up to the common terms: the responsibility of +m is sigmoid(2 a m z / var).
        r = torch.sigmoid(2.0 * a * self.m * zd / var)
        mu = self.m * (2.0 * r - 1.0)  # E[mu_k | z]
        x_hat = mu + gain * (zd - a * mu)
        eps = (zd - a * x_hat) / sg
        return x_hat, eps, a, sg

    def cdf(self, x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        k = self.s * math.sqrt(2.0)
        return 0.25 * (torch.erfc(-(x + self.m) / k) + torch.erfc(-(x - self.m) / k))


def wasserstein1(samples: torch.Tensor, cdf, lo: float, hi: float, points: int = 8001) -> float:
    """W1 = int |F_n(x) - F(x)| dx between the empirical distribution of `samples` (all elements pooled) and the
    exact per-element CDF `cdf`, by the trapezoid rule on [lo, hi] (both must hold essentially all the mass)."""
    s = samples.detach().double().flatten().sort().values.cpu()
    grid = torch.linspace(lo, hi, points, dtype=torch.float64)
    emp = torch.searchsorted(s, grid, right=True).double() / s.numel()
    return torch.trapezoid((emp - cdf(grid)).abs(), grid).item()


__all__ = ["GaussianOracle", "MixtureOracle", "wasserstein1"]
