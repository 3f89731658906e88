"""vdm_fast's benchmarks, installed as vdm_fast.benchmarks so `vdm-fast bench` runs from any directory.

One module per op or component, `bench_<name>.py`, each exposing `run(quick: bool) -> list[dict]`; `run.py` collects
them, measures the device's ceilings first, and writes the table, a JSON file and a plot.
"""
