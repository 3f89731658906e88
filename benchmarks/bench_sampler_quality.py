"""Sample quality against cost: each sampler's error against the number of model calls, on exact denoisers.

Two oracles whose posterior mean is exact (vdm_fast/diffusion/oracles.py), so every error is the sampler's own:
- "gaussian": x ~ N(0.3, 0.5^2) per element;
- "bimodal": x ~ 0.5 N(-0.6, 0.1^2) + 0.5 N(0.6, 0.1^2) per element (how much a sampler blurs sharp modes).
The error is the Wasserstein-1 distance between the samples (all elements pooled) and the exact data distribution;
Monte Carlo noise alone gives about 0.8 sd / sqrt(n) (the "floor" in each row's note). Samples are drawn with
v-prediction, clip=False, one generator seed per row. Model calls: `steps` for every sampler, 2 x steps for "pc"
(one Langevin corrector step per step).

Rows: op "sampler quality (<oracle>)", contender "<sampler> / <timesteps>, <calls> calls", ms = wall-clock time of
the whole sampling run (CPU, 1 thread: the oracles are cheap, so this is the sampler loop's own cost), and the
error in the note and in the row's "error" field. `python -m benchmarks.bench_sampler_quality --png PATH` also draws
the error curves (matplotlib, optional) - docs/sampler_quality.png was made that way.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from .common import row

ORACLES = {"gaussian": (-2.5, 3.1), "bimodal": (-1.6, 1.6)}  # W1 integration ranges: all the mass, both oracles


def _oracle(name: str):
    from vdm_fast.diffusion.oracles import GaussianOracle, MixtureOracle

    return GaussianOracle("v", mean=0.3, std=0.5) if name == "gaussian" else MixtureOracle("v", m=0.6, s=0.1)


def measure(oracle: str, sampler: str, timesteps: str, calls: int, n: int, seed: int = 0) -> tuple[float, float]:
    """(W1 error, wall-clock ms) of one sampling run with about `calls` model calls."""
    from vdm_fast.diffusion import GaussianDiffusion
    from vdm_fast.diffusion.oracles import wasserstein1

    orc = _oracle(oracle)
    d = GaussianDiffusion(orc, prediction="v")
    steps = max(1, calls // 2) if sampler == "pc" else calls
    t0 = time.perf_counter()
    x = d.sample((n, 1, 1, 1, 1), steps=steps, sampler=sampler, timesteps=timesteps, clip=False, progress=False,
                 generator=torch.Generator().manual_seed(seed))
    ms = (time.perf_counter() - t0) * 1e3
    lo, hi = ORACLES[oracle]
    return wasserstein1(x, orc.cdf, lo, hi), ms


def run(quick: bool = False) -> list[dict]:
    from vdm_fast.diffusion import SAMPLERS, TIMESTEPS
    from vdm_fast.diffusion.samplers import DEFAULT_TIMESTEPS

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    n = 1 << (13 if quick else 15)
    calls_grid = (10, 25, 50) if quick else (10, 15, 25, 50, 100, 256)
    rows = []
    try:
        for oracle in ORACLES:
            floor = 0.8 * (0.5 if oracle == "gaussian" else 0.6) / math.sqrt(n)
            for sampler in SAMPLERS:
                grids = (DEFAULT_TIMESTEPS[sampler],) if quick else TIMESTEPS
                for ts in grids:
                    for calls in calls_grid:
                        err, ms = measure(oracle, sampler, ts, calls, n, seed=calls)
                        r = row(f"sampler quality ({oracle})", (n,), torch.float32, f"{sampler} / {ts}, {calls} calls",
                                ms, note=f"W1 {err:.4f} (floor ~{floor:.4f})")
                        r.update(oracle=oracle, sampler=sampler, timesteps=ts, calls=calls, error=err,
                                 default_grid=ts == DEFAULT_TIMESTEPS[sampler])
                        rows.append(r)
    finally:
        torch.set_num_threads(threads)
    return rows


def write_png(rows: list[dict], path: str) -> None:
    import matplotlib  # optional: the plot extra

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    oracles = list(dict.fromkeys(r["oracle"] for r in rows))
    fig, axes = plt.subplots(1, len(oracles), figsize=(6.5 * len(oracles), 5), squeeze=False)
    for ax, oracle in zip(axes[0], oracles):
        sub = [r for r in rows if r["oracle"] == oracle]
        for (sampler, ts) in dict.fromkeys((r["sampler"], r["timesteps"]) for r in sub):
            pts = sorted((r["calls"], r["error"]) for r in sub if r["sampler"] == sampler and r["timesteps"] == ts)
            default = any(r["default_grid"] for r in sub if r["sampler"] == sampler and r["timesteps"] == ts)
            if not default and ts == "logsnr":
                continue  # uniform-in-log-SNR is worst everywhere; kept in the JSON rows, left out of the plot
            ax.plot(*zip(*pts), "-o" if default else "--", ms=3, lw=1.8 if default else 1.0,
                    label=f"{sampler} / {ts}" + (" (default)" if default else ""))
        n = int(sub[0]["shape"].strip("(),"))
        ax.axhline(0.8 * (0.5 if oracle == "gaussian" else 0.6) / math.sqrt(n), color="grey", lw=0.8, ls=":",
                   label="Monte Carlo floor")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("model calls")
        ax.set_ylabel("Wasserstein-1 error to the data")
        ax.set_title({"gaussian": "Gaussian data N(0.3, 0.5²)",
                      "bimodal": "bimodal data ½N(-0.6, 0.1²) + ½N(0.6, 0.1²)"}.get(oracle, oracle))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--png", default=None, help="write the error curves to this PNG (needs matplotlib)")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = p.parse_args()
    result = run(quick=args.quick)
    for r in result:
        print(f"{r['oracle']:9s} {r['sampler']:13s} {r['timesteps']:8s} {r['calls']:4d} calls  W1 {r['error']:.4f}  "
              f"{r['ms']:.0f} ms")
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    if args.png:
        write_png(result, args.png)
