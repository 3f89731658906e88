"""The command line: `vdm-fast info` and `vdm-fast bench` run on a machine without a GPU and say so."""

from __future__ import annotations

import json

from helpers import run_python
from vdm_fast.benchmarks import readme_table


def _run(*args):
    return run_python("-m", "vdm_fast", *args)


def test_info_lists_versions_extension_and_ops():
    proc = _run("info")
    assert proc.returncode == 0, proc.stderr
    for word in ("torch", "triton", "vdm_fast._C", "rel_pos_bias", "backend mode"):
        assert word in proc.stdout


def test_bench_quick_on_cpu_writes_json(tmp_path):
    proc = _run("bench", "--quick", "--filter", "rel_pos_bias", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list(tmp_path.glob("bench-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["environment"]["torch"] and data["rows"]
    assert all(r["ms"] and r["ms"] > 0 for r in data["rows"])
    if "GPU" not in data["environment"]["device"]:
        assert "Triton kernels need" in proc.stdout


def test_bench_rejects_unknown_filter(tmp_path):
    proc = _run("bench", "--filter", "no_such_op", "--out", str(tmp_path))
    assert proc.returncode != 0 and "matches no benchmark" in proc.stderr


def test_readme_table_is_generated_from_results(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"x\n{readme_table.START}\nold\n{readme_table.END}\ny\n")
    results = tmp_path / "results"
    results.mkdir()
    assert readme_table.main([str(readme), str(results)]) == 0
    assert "No GPU results yet" in readme.read_text()
    (results / "bench-h100.json").write_text(json.dumps({"environment": {
        "device": "NVIDIA H100", "torch": "2.11", "date": "2026-11-25T00:00:00", "copy_bandwidth_gbps": 3000.0},
        "rows": [{"op": "gn", "shape": "(2,)", "dtype": "bf16", "contender": "eager", "ms": 1.0, "baseline_ms": 3.0,
                  "speedup": 3.0, "gbps": 2700.0, "pct_copy_bw": 90.0, "note": ""}]}))
    assert readme_table.main([str(readme), str(results)]) == 0
    text = readme.read_text()
    assert "NVIDIA H100" in text and "| 3.00 |" in text and "old" not in text and text.endswith("y\n")
