"""Smoke test: the scaling benchmark runs in its small CPU mode on 2 of the 8 virtual
devices, in both modes, and fills every column of its CSV."""

import csv
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent


def test_small_run_fills_the_table(tmp_path):
  output = tmp_path / "scaling.csv"
  done = subprocess.run(
      [sys.executable, str(ROOT / "experiments/bench_scaling.py"), "--small",
       "--device_counts=1,2", "--steps=1", "--repeats=1", f"--output={output}"],
      capture_output=True, text=True, timeout=600, cwd=ROOT,
      env={**os.environ, "JAX_NUM_CPU_DEVICES": "8"})
  assert done.returncode == 0, done.stderr[-3000:]
  with open(output, newline="") as f:
    rows = list(csv.DictReader(f))
  # 2 modes x 2 device counts, at the small mode's one length.
  assert [(r["mode"], r["seq_len"], r["devices"]) for r in rows] == [
      (mode, "256", n) for mode in ("data", "seq") for n in ("1", "2")]
  for row in rows:
    devices, batch = int(row["devices"]), int(row["global_batch"])
    # Data parallelism adds a sequence per device; context parallelism splits one.
    assert batch == (devices if row["mode"] == "data" else 1), row
    tokens_per_s = float(row["tokens_per_s"])
    assert tokens_per_s > 0
    assert abs(tokens_per_s - batch * int(row["seq_len"]) / (float(row["median_ms"]) / 1e3)) \
        <= 1e-6 * tokens_per_s
    assert abs(float(row["tokens_per_s_per_device"]) * devices - tokens_per_s) \
        <= 1e-6 * tokens_per_s
    if devices == 1:
      assert float(row["efficiency"]) == 1.0


def test_too_many_devices_is_refused():
  done = subprocess.run(
      [sys.executable, str(ROOT / "experiments/bench_scaling.py"), "--small",
       "--device_counts=16", "--modes=data"],
      capture_output=True, text=True, timeout=300, cwd=ROOT,
      env={**os.environ, "JAX_NUM_CPU_DEVICES": "8"})
  assert done.returncode != 0
  assert "--device_counts asks for 16 devices; there are 8" in done.stderr
