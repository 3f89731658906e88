"""Sampling loop: time per step against the bare model forward (the loop's own overhead), and the CUDA-graph loop
against the eager loop.

Rows (per model, batch 1, for the paper's ancestral sampler and the fast default dpmpp_2m):
- "sample step, eager loop": ms per step of GaussianDiffusion.sample(cuda_graph=False); baseline = one bare model
  forward (eager). On CPU this is the only row that runs.
- "sample step, cuda graph": ms per step of sample() with the default CUDA-graph loop (warm-up, capture and the
  eager last step included, amortised over the steps); baseline = one bare model forward replayed from a CUDA graph.
  Target: overhead (ms / baseline - 1) < 3%.
- "graph loop vs eager loop": the same graph-loop ms against the eager-loop ms (speedup > 1 is the gain).
The models: the project's Unet3D presets when importable ("tiny" 8x16x16, and on a GPU "ucf101" 16x64x64 at full
size), else a small 3D conv net. Samples are checked first: the graph loop must reproduce the eager loop's samples
(same generator seed: the same noise is drawn in the same order).
"""

from __future__ import annotations

import torch

from .common import GPU, NOT_RUN_GPU, check_close, row, time_ms


class _ConvNet(torch.nn.Module):
    """Fallback model: a few 1x3x3 convolutions with a noise-level embedding (the sampler only needs a callable)."""

    def __init__(self, c: int = 3, width: int = 64):
        super().__init__()
        self.inp = torch.nn.Conv3d(c, width, (1, 3, 3), padding=(0, 1, 1))
        self.mid = torch.nn.Conv3d(width, width, (1, 3, 3), padding=(0, 1, 1))
        self.out = torch.nn.Conv3d(width, c, (1, 3, 3), padding=(0, 1, 1))
        self.emb = torch.nn.Linear(1, width)

    def forward(self, z, logsnr, cond=None, cond_mask=None, **kw):
        h = self.inp(z) + self.emb(logsnr[:, None] / 20.0)[:, :, None, None, None]
        return self.out(torch.nn.functional.silu(self.mid(torch.nn.functional.silu(h))))


def _models(quick: bool, device: str) -> list[tuple[str, torch.nn.Module, tuple[int, ...]]]:
    try:
        from vdm_fast.model import Unet3D

        out = [("unet3d tiny", Unet3D.preset("tiny"), (1, 3, 8, 16, 16))]
        if device == "cuda" and not quick:
            out.append(("unet3d ucf101", Unet3D.preset("ucf101"), (1, 3, 16, 64, 64)))
    except Exception:  # the model package is optional for this benchmark
        out = [("conv net", _ConvNet(), (1, 3, 8, 16, 16))]
    return [(name, m.to(device).eval(), shape) for name, m, shape in out]


def _bare_forward(model, shape, device):
    z = torch.randn(shape, device=device)
    lam = torch.zeros(shape[0], device=device)
    return lambda: model(z, lam), z, lam


def _graphed_forward(model, z, lam):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            model(z, lam)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        model(z, lam)
    return graph.replay


def run(quick: bool = False) -> list[dict]:
    # On CPU one intra-op thread: these small models gain nothing from more, and on a shared machine the thread
    # pool's spin-waits make timings meaningless (100 ms forwards measured at 3 s).
    threads = torch.get_num_threads()
    if not GPU:
        torch.set_num_threads(1)
    try:
        return _run(quick)
    finally:
        torch.set_num_threads(threads)


# The paper's sampler and the fast default (its multistep history adds two buffers to the fused update).
SAMPLERS = ("ancestral", "dpmpp_2m")


def _run(quick: bool) -> list[dict]:
    from vdm_fast.diffusion import GaussianDiffusion

    device = "cuda" if GPU else "cpu"
    steps = (16 if quick else 64) if GPU else (4 if quick else 8)
    rows = []
    for name, model, shape in _models(quick, device):
        d = GaussianDiffusion(model, prediction="v")
        fwd, z, lam = _bare_forward(model, shape, device)
        with torch.no_grad():
            bare_ms = time_ms(fwd, quick=quick)
        for sampler in SAMPLERS:
            rows += _sampler_rows(d, name, sampler, shape, steps, device, quick, bare_ms, model, z, lam)
    return rows


def _sampler_rows(d, name, sampler, shape, steps, device, quick, bare_ms, model, z, lam) -> list[dict]:
    def sample(graph: bool):
        g = torch.Generator(device=device).manual_seed(0)
        return d.sample(shape, steps=steps, sampler=sampler, progress=False, cuda_graph=graph, generator=g,
                        device=device)

    op = f"sample step ({name}, {sampler})"
    eager_ms = time_ms(lambda: sample(False), quick=quick) / steps
    cpu = "" if GPU else "; CPU, 1 thread"
    rows = [row(op, shape, torch.float32, "eager loop vs bare forward", eager_ms, baseline_ms=bare_ms,
                note=f"{steps} {sampler} steps; loop overhead {100 * (eager_ms / bare_ms - 1):+.1f}%{cpu}")]
    if not GPU:
        for contender in ("cuda graph vs bare forward (graphed)", "graph loop vs eager loop"):
            rows.append(row(op, shape, torch.float32, contender, None, note=NOT_RUN_GPU.replace(
                "Triton kernels", "CUDA graphs")))
        return rows
    check_close("cuda graph loop", sample(True), sample(False), 1e-5)
    info = dict(d.last_sample_info)
    graph_ms = time_ms(lambda: sample(True), quick=quick) / steps
    with torch.no_grad():
        bare_graph_ms = time_ms(_graphed_forward(model, z, lam), quick=quick)
    why = "" if info.get("cuda_graph") else f"; NOT captured: {info.get('reason')}"
    rows.append(row(op, shape, torch.float32, "cuda graph vs bare forward (graphed)", graph_ms,
                    baseline_ms=bare_graph_ms,
                    note=f"overhead {100 * (graph_ms / bare_graph_ms - 1):+.1f}% (target < 3%){why}"))
    rows.append(row(op, shape, torch.float32, "graph loop vs eager loop", graph_ms, baseline_ms=eager_ms,
                    note=why.lstrip("; ")))
    return rows


if __name__ == "__main__":
    for r in run(quick=True):
        print(r)
