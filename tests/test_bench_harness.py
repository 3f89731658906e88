"""The `vdm-fast bench` harness (benchmarks/run.py, common.py) on fake rows: no timing is asserted, only what a user
reads: the spread of every timing, noisy rows flagged, thread counts, full names in a table that fits 120 columns,
the layout on every row, GPU-only rows in one line (and all in the JSON), results named by date and device that
never overwrite, and a plot (or one line without matplotlib). Also gpu_check.sh's syntax and its dry run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from vdm_fast.benchmarks import common, run

ROOT = Path(__file__).resolve().parents[1]
LONG_OP = "unet3d train step (fwd+bwd, bf16 autocast, gradient checkpointing of every level)"


def _rows() -> list[dict]:
    steady = common.Timing([1.0, 1.01, 0.99, 1.0, 1.02])
    base = common.Timing([3.0, 3.03, 2.97, 3.0, 3.01])
    noisy = common.Timing([1.0, 4.0, 0.5, 2.0, 9.0])
    rows = [common.row(LONG_OP, (2, 3, 16, 64, 64), "float32", "vdm_fast vs reference torch.compile (inductor)",
                       steady, baseline_ms=base, layout="channels_last_3d, per_frame", device="cpu"),
            common.row("rel_pos_bias fwd", (1, 8, 16, 16), "float32", "vdm_fast._C vs reference", noisy,
                       baseline_ms=base, device="cpu")]
    rows += [common.row(f"group_norm_silu {d}", (2, 256, 16, 64, 64), "bfloat16", "vdm_fast (triton)", None,
                        note=common.NOT_RUN_GPU, layout=layout)
             for d in ("fwd", "bwd") for layout in ("contig, per_frame", "cl, per_frame", "contig")]
    # A module that builds its dict by hand (as bench_temporal_attention does) gets the same fields.
    rows.append({"op": "temporal_attention", "shape": "(4096, 8, 16, 64)", "dtype": "bfloat16",
                 "contender": "vdm_fast", "ms": None, "baseline_ms": None, "speedup": None, "gbps": None,
                 "pct_copy_bw": None, "peak_mb": None, "note": "not run: Triton kernels need a CUDA GPU"})
    return rows


def test_timing_carries_its_spread():
    t = common.Timing([5.0, 1.0, 3.0, 2.0, 4.0])
    assert float(t) == 3.0 and (t.min, t.max, t.n) == (1.0, 5.0, 5)
    assert t.q1 == 2.0 and t.q3 == 4.0 and t.spread == pytest.approx(2 / 3)
    assert isinstance(t * 2, float) and not isinstance(t * 2, common.Timing)
    assert json.loads(json.dumps({"ms": t}))["ms"] == 3.0
    with pytest.raises(ValueError):
        common.Timing([])


def test_time_ms_repeats_at_least_the_setting(monkeypatch):
    monkeypatch.setattr(common.settings, "repeats", 9)
    calls = []
    t = common.time_ms(lambda: calls.append(1), quick=True, device="cpu")
    assert isinstance(t, common.Timing) and t.n >= 9 and len(calls) == t.n + 1  # + the warm-up


def test_rows_have_spread_threads_noisy_and_gpu_flags():
    rows = [common.normalize(r) for r in _rows()]
    timed, noisy = rows[0], rows[1]
    assert timed["ms_repeats"] == 5 and timed["ms_q1"] <= timed["ms"] <= timed["ms_q3"]
    assert timed["speedup_low"] <= timed["speedup"] <= timed["speedup_high"]
    assert not timed["noisy"] and noisy["noisy"]
    assert timed["threads"] >= 1 and timed["layout"] == "channels_last_3d, per_frame"
    assert all(r["needs_gpu"] for r in rows[2:]) and not any(r["needs_gpu"] for r in rows[:2])
    assert type(timed["ms"]) is float
    for key in ("op", "shape", "dtype", "contender", "ms", "baseline_ms", "speedup", "gbps", "pct_copy_bw",
                "peak_mb", "note"):  # the fields results had before: kept
        assert all(key in r for r in rows)


def test_table_fits_120_columns_with_full_names_and_one_gpu_line():
    text = run.table(_rows())
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 120
    flat = " ".join(" ".join(lines).split())
    for word in LONG_OP.split() + "vdm_fast vs reference torch.compile (inductor)".split():
        assert word in flat  # wrapped, never cut
    assert "channels_last_3d," in flat and "per_frame" in flat  # the layout label, wrapped in its column
    gpu_lines = [line for line in lines if "CUDA GPU" in line]
    assert len(gpu_lines) == 1 and "7 rows" in gpu_lines[0]
    assert "group_norm_silu" in gpu_lines[0] and "temporal_attention" in gpu_lines[0]
    assert "not run" not in text.replace("not run here", "")  # no row of "not run"
    assert "noisy" in text and "1 of 2 rows" in text and "!" in text


def test_header_on_cpu_names_no_cuda_version():
    env = {"gpu": False, "device": "CPU (AMD EPYC)", "cpu_count": 2, "threads": 2, "torch": "2.13.0",
           "torch_cuda_build": "13.0", "cuda": None, "triton": "3.6.0", "date": "2026-12-01T00:00:00+00:00"}
    head = run.header(env, quick=True, repeats=7)
    assert "no CUDA GPU visible" in head and "CUDA 13.0" not in head and head.count("CUDA") == 1
    gpu = dict(env, gpu=True, device="NVIDIA H200", cuda="13.0", driver="580.1")
    assert "NVIDIA H200" in run.header(gpu, quick=False, repeats=7) and "CUDA 13.0" in run.header(gpu, False, 7)


def test_results_are_named_by_date_and_device_and_never_overwritten(tmp_path):
    env = {"date": "2026-12-01T20:30:05+00:00", "device": "NVIDIA H200"}
    stem = run.result_stem(env)
    assert stem == "bench-20261201-203005-nvidia-h200"
    first = run.write_new(tmp_path / f"{stem}.json", b"1")
    second = run.write_new(tmp_path / f"{stem}.json", b"2")
    assert first != second and first.read_bytes() == b"1" and second.read_bytes() == b"2"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{stem}-2.json", f"{stem}.json"]  # no temp files left


def test_out_folder_checked_before_work(tmp_path):
    afile = tmp_path / "f"
    afile.write_text("")
    with pytest.raises(ValueError, match="--out"):
        run.check_out_dir(afile)
    with pytest.raises(ValueError, match="--out"):
        run.check_out_dir(afile / "sub")
    assert run.check_out_dir(tmp_path / "new" / "dir").is_dir()


@pytest.fixture
def fake_bench(monkeypatch):
    """A benchmark module `bench_fake` returning the fake rows, as the only one discovered."""
    mod = types.ModuleType("vdm_fast.benchmarks.bench_fake")
    mod.run = lambda quick=False: _rows()
    monkeypatch.setitem(sys.modules, "vdm_fast.benchmarks.bench_fake", mod)
    monkeypatch.setattr(run, "modules", lambda name_filter="": ["bench_fake"])
    monkeypatch.setattr(common.settings, "repeats", common.settings.repeats)  # restored after the test


def test_main_writes_json_and_plot_in_the_default_folder_twice(fake_bench, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    assert run.main(["--quick", "--repeats", "3"]) == 0
    assert run.main(["--quick"]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / run.DEFAULT_OUT
    jsons, pngs = sorted(folder.glob("bench-*.json")), sorted(folder.glob("bench-*.png"))
    assert len(jsons) == 2 and len(pngs) == 2  # the second run did not overwrite the first
    data = json.loads(jsons[0].read_text())
    assert len(data["rows"]) == len(_rows())  # GPU-only rows kept in the JSON
    assert data["settings"]["repeats"] in (3, common.settings.repeats) and data["environment"]["threads"] >= 1
    assert max(len(line) for line in out.splitlines()) <= 120
    if not common.GPU:
        assert data["environment"]["copy_bandwidth_gbps"] is None and "GPU ceilings" in out
    assert pngs[0].read_bytes()[:4] == b"\x89PNG"


def test_a_benchmark_needing_a_missing_package_is_one_row(monkeypatch, tmp_path, capsys):
    mod = types.ModuleType("vdm_fast.benchmarks.bench_fake")

    def needs_triton(quick=False):
        raise ModuleNotFoundError("No module named 'triton'", name="triton")

    mod.run = needs_triton
    monkeypatch.setitem(sys.modules, "vdm_fast.benchmarks.bench_fake", mod)
    monkeypatch.setattr(run, "modules", lambda name_filter="": ["bench_fake"])
    assert run.main(["--out", str(tmp_path), "--no-plot"]) == 0
    captured = capsys.readouterr()
    assert "needs the triton package" in captured.out and "Traceback" not in captured.err
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
    assert len(rows) == 1 and rows[0]["op"] == "fake"


def test_plot_without_matplotlib_says_so(fake_bench, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    message = run.plot(_rows(), tmp_path / "p.png", "t")
    assert "matplotlib is not installed" in message and not (tmp_path / "p.png").exists()
    assert run.main(["--out", str(tmp_path / "r")]) == 0  # the bench itself still runs and writes its JSON
    assert len(list((tmp_path / "r").glob("*.json"))) == 1


def test_plot_labels_are_not_clipped(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    rows = [common.normalize(r) for r in _rows()[:2]]
    run.plot(rows, tmp_path / "p.png", "title")
    with Image.open(tmp_path / "p.png") as im:
        px = im.convert("L").load()
        w, h = im.size
        # bbox_inches="tight" keeps a white margin: no label runs off the left edge.
        assert all(px[0, y] > 200 for y in range(h))


@pytest.mark.slow  # about a minute of wall time (each phase runs to its tiny cap), little CPU
def test_gpu_check_script_parses_and_dry_runs(tmp_path):
    script = ROOT / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", "-S", "warning", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout
    proc = subprocess.run(["bash", str(script), "--dry-run"], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OUT": str(tmp_path)}, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for phase in ("== device", "== install", "== gpu tests", "== headline benchmarks", "== other benchmarks",
                  "== summary"):
        assert phase in out, phase
    assert out.index("== summary") > out.index("== other benchmarks")  # the short table comes last
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["dry_run"] is True and summary["device"] and summary["phases"]
