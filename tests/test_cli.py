"""The command line as a user meets it: `vdm-fast` alone prints the help, `--version`, and every user error of
`sample`, `bench`, `info` (and the shared `--device` check) is one line on stderr naming the option and what it
allows, with exit status 2 and no traceback, raised before any work (no checkpoint loaded, no step sampled)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import run_python
from vdm_fast.benchmarks import readme_table

from vdm_fast import checkpoint as ckpt
from vdm_fast.model import Unet3D


def _run(*args, env=None):
    return run_python("-m", "vdm_fast", *args, env=env)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder holding one checkpoint of a micro U-Net (4 frames of 8x8), as `vdm-fast train` writes it."""
    root = tmp_path_factory.mktemp("run")
    model = Unet3D(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(4,), attn_head_dim=8,
                   image_size=8, num_frames=4, norm_groups=4)
    config = {"model": model.config.to_dict(), "diffusion": {"prediction": "v"},
              "data": {"num_classes": 0, "frames": 4, "resolution": 8, "channels": 3}}
    ckpt.save(root, 1, config=config, model=model.state_dict())
    return root


def test_info_lists_versions_extension_and_ops():
    proc = _run("info")
    assert proc.returncode == 0, proc.stderr
    for word in ("torch", "triton", "vdm_fast._C", "rel_pos_bias", "backend mode"):
        assert word in proc.stdout


# Each case: argv (RUN stands for the run folder, FILE for a regular file, TMP for a fresh folder) and the words
# its one-line message must hold: the option and what it allows.
CASES = [
    (["sample", "--run", "RUN", "--frames", "200"], ["--frames", "128", "--extend-to"]),
    (["sample", "--run", "RUN", "--out", "TMP/x.foo"], ["--out", ".foo", ".gif", ".png", ".mp4"]),
    (["sample", "--run", "RUN", "--out", "FILE/x.gif"], ["--out", "not a folder"]),
    (["sample", "--run", "RUN", "--out", "TMP"], ["--out", "folder"]),
    (["sample", "--run", "RUN", "--out", "TMP/x.mp4"], ["--out", "imageio_ffmpeg", "vdm_fast[video]"]),
    (["sample", "--run", "TMP/none"], ["--run", "no such"]),
    (["sample", "--run", "TMP"], ["--run", "no checkpoint"]),
    (["sample"], ["--run", "required"]),
    (["sample", "--run", "RUN", "--sampler", "foo"], ["--sampler", "ancestral", "ddim", "pc"]),
    (["sample", "--run", "RUN", "--guidance", "nan"], ["--guidance", "finite"]),
    (["sample", "--run", "RUN", "--guidance", "-1"], ["--guidance", ">= 0"]),
    (["sample", "--run", "RUN", "--steps", "0"], ["--steps", ">= 1"]),
    (["sample", "--run", "RUN", "--num", "x"], ["--num", "integer"]),
    (["sample", "--run", "RUN", "--fps", "inf"], ["--fps", "> 0"]),
    (["sample", "--run", "RUN", "--seed", "-1"], ["--seed", ">= 0"]),
    (["sample", "--run", "RUN", "--threads", "-2"], ["--threads", ">= 0"]),
    (["sample", "--run", "RUN", "--resolution", "7"], ["--resolution", "multiple of 2"]),
    (["sample", "--run", "RUN", "--label", "1"], ["--label", "--class-cond"]),
    (["sample", "--run", "RUN", "--guidance", "2"], ["--guidance", "--class-cond"]),
    (["sample", "--run", "RUN", "--corrector-steps", "2"], ["--corrector-steps", "--sampler pc"]),
    (["sample", "--run", "RUN", "--window", "8"], ["--window", "--extend-to"]),
    (["sample", "--run", "RUN", "--extend-to", "8", "--window", "300"], ["--window", "2..128"]),
    (["sample", "--run", "RUN", "--extend-to", "3"], ["--extend-to", "must exceed", "4"]),
    (["sample", "--run", "RUN", "--extend-to", "8", "--overlap", "4"], ["--overlap", "window"]),
    (["sample", "--run", "RUN", "--strip", "TMP/s.gif"], ["--strip", ".png"]),
    (["sample", "--run", "RUN", "--bogus"], ["vdm-fast sample", "unrecognized", "--bogus"]),
    (["info", "--bogus"], ["vdm-fast info", "--bogus"]),
    (["bench", "--filter", "no_such_op"], ["--filter", "no_such_op", "rel_pos_bias"]),
    (["bench", "--out", "FILE"], ["--out", "not a folder"]),
    (["bench", "--repeats", "0"], ["--repeats", ">= 1"]),
    (["bogus"], ["COMMAND", "sample", "bench"]),
]
if not torch.cuda.is_available():
    CASES += [(["sample", "--run", "RUN", "--device", "cuda"], ["--device cuda", "no CUDA GPU", "cpu"])]
CASES += [(["sample", "--run", "RUN", "--device", "tpu"], ["--device", "auto, cpu, cuda"])]

# One process runs every case through the entry point's main(), as `vdm-fast ARGS` would (argparse's exits
# included), and reports (exit status, stderr, stdout) per case; an exception escaping main() is a failure.
# imageio_ffmpeg is blocked so that mp4 output lacks its extra, as after the plain install.
BATCH = r"""
import contextlib, io, json, sys
sys.modules["imageio_ffmpeg"] = None
from vdm_fast.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
        except BaseException as e:
            rc = "escaped: " + type(e).__name__ + ": " + str(e)
    results.append([rc, err.getvalue(), out.getvalue()])
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def batch(run_dir, tmp_path_factory):
    """(exit status, stderr, stdout) of `vdm-fast ARGS` for the plain calls and every CASES entry, from one
    process (starting Python and torch once instead of 30 times)."""
    tmp = tmp_path_factory.mktemp("cli")
    afile = tmp / "afile"
    afile.write_text("x")
    subst = {"RUN": str(run_dir), "FILE": str(afile), "TMP": str(tmp)}

    def fill(a):
        for k, v in subst.items():
            if a == k or a.startswith(k + "/"):
                return v + a[len(k):]
        return a

    argvs = [[], ["--version"], ["--help"]] + [[fill(a) for a in argv] for argv, _ in CASES]
    proc = run_python("-c", BATCH, json.dumps(argvs), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"plain": results[:3], "cases": results[3:], "tmp": tmp}


def test_bare_command_prints_help_and_version(batch):
    import vdm_fast

    (rc, err, out), (vrc, _, vout), (hrc, _, hout) = batch["plain"]
    assert rc == 0 and hrc == 0, err
    assert out.startswith("usage: vdm-fast") and out == hout
    for name in ("info", "bench", "train", "sample", "--version"):
        assert name in out
    assert vrc == 0 and vout.strip() == f"vdm-fast {vdm_fast.__version__}"


@pytest.mark.parametrize("i", range(len(CASES)), ids=[" ".join(a[:1] + a[3:] if len(a) > 3 else a) for a, _ in CASES])
def test_every_user_error_is_one_line_naming_the_option(batch, i):
    argv, words = CASES[i]
    rc, err, out = batch["cases"][i]
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (argv, rc, err)
    assert len(lines) == 1, (argv, err)  # one line: no usage block, no traceback, no "sampling ..." line
    assert lines[0].startswith("vdm-fast") and ": error: " in lines[0], (argv, err)
    for w in words:
        assert w in lines[0], (argv, w, lines[0])


def test_user_errors_write_nothing(batch):
    assert not [p.name for p in batch["tmp"].iterdir() if p.name != "afile"]


def test_sample_writes_gif_and_strip_with_progress_lines(run_dir, tmp_path):
    """The whole command on the micro run: a GIF with every frame, a strip that says it keeps fewer frames, plain
    progress lines when stderr is no terminal, and a final line."""
    from PIL import Image

    gif, strip = tmp_path / "out" / "s.gif", tmp_path / "s.png"
    env = dict(os.environ, VDM_FAST_PROGRESS_SECONDS="0")
    proc = _run("sample", "--run", str(run_dir), "--num", "2", "--frames", "6", "--steps", "2", "--threads", "1",
                "--out", str(gif), "--strip", str(strip), "--strip-frames", "4", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sampling: 1/2 steps" in proc.stderr and "\r" not in proc.stderr
    assert "shows 4 of the 6 frames" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("sampled 2 videos of 6 frames")
    with Image.open(gif) as im:
        assert im.n_frames == 6
    with Image.open(strip) as im:
        assert im.format == "PNG" and im.width > im.height  # 4 columns of frames, 2 rows of videos

    proc = _run("sample", "--run", str(run_dir), "--num", "1", "--steps", "2", "--threads", "1", "--no-progress",
                "--out", str(tmp_path / "q.png"), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sampling:" not in proc.stderr and "sampled 1 video of 4 frames" in proc.stderr
    assert (tmp_path / "q.png").is_file()


def test_ctrl_c_while_sampling_is_one_line_and_exit_130(run_dir, tmp_path):
    import signal
    import subprocess
    import sys
    import tempfile

    env = dict(os.environ, VDM_FAST_PROGRESS_SECONDS="0")
    proc = subprocess.Popen([sys.executable, "-m", "vdm_fast", "sample", "--run", str(run_dir), "--steps", "100000",
                             "--num", "1", "--threads", "1", "--out", str(tmp_path / "x.gif")], env=env,
                            cwd=tempfile.gettempdir(), stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # wait until sampling has started
            if line.startswith("sampling: 1/"):
                break
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        assert proc.wait(timeout=120) == 130
    finally:
        proc.kill()
    assert "Traceback" not in rest and rest.strip().splitlines()[-1] == "vdm-fast sample: interrupted"
    assert not (tmp_path / "x.gif").exists()


def test_bench_quick_on_cpu_writes_json(tmp_path):
    proc = _run("bench", "--quick", "--filter", "rel_pos_bias", "--repeats", "3", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list(tmp_path.glob("bench-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["environment"]["torch"] and data["rows"]
    assert all(r["ms"] and r["ms"] > 0 and r["ms_repeats"] >= 3 for r in data["rows"])
    # every line fits 120 columns but the ones naming the files written: a path is as long as it is (pytest's
    # tmp_path and the device's name in the file name made 133 on a Xeon), and stays whole to be copied
    long = [line for line in proc.stdout.splitlines() if len(line) > 120 and str(tmp_path) not in line]
    assert not long, long
    if not torch.cuda.is_available():
        assert all(r["threads"] >= 1 for r in data["rows"])
        assert "no CUDA GPU" in proc.stdout and "CUDA 1" not in proc.stdout.splitlines()[0]


def test_readme_table_is_generated_from_results(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"x\n{readme_table.START}\nold\n{readme_table.END}\ny\n")
    results = tmp_path / "results"
    results.mkdir()
    assert readme_table.main([str(readme), str(results)]) == 0
    assert "unmeasured" in readme.read_text()
    (results / "bench-h100.json").write_text(json.dumps({"environment": {
        "device": "NVIDIA H100", "torch": "2.11", "date": "2026-11-25T00:00:00", "copy_bandwidth_gbps": 3000.0,
        "gpu": True}, "rows": [{"op": "gn", "shape": "(2,)", "dtype": "bf16", "contender": "eager", "ms": 1.0,
                               "baseline_ms": 3.0, "speedup": 3.0, "gbps": 2700.0, "pct_copy_bw": 90.0,
                               "note": ""}]}))
    assert readme_table.main([str(readme), str(results)]) == 0
    text = readme.read_text()
    assert "NVIDIA H100" in text and "3.00x" in text and "old" not in text and text.endswith("y\n")
