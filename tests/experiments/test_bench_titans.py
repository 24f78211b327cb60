"""Smoke test: the Titans benchmark runs in its small CPU mode, fills every row of its table,
and its memjax implementations agree with the xla path."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent


def test_small_run_fills_the_table():
  done = subprocess.run(
      [sys.executable, str(ROOT / "experiments/bench_titans.py"), "--small", "--noanchor"],
      capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert done.returncode == 0, done.stderr[-3000:]
  lines = done.stdout.splitlines()
  # The whole table is printed again at the end: the rows after the last header.
  table = lines[max(i for i, line in enumerate(lines) if line.startswith("|---")) + 1:]
  rows = [line.split("|")[1:-1] for line in table if line.startswith("| ")]
  # (linear and mlp x xla, reference and pallas) x float32 and bfloat16 x forward and
  # forward+backward.
  assert len(rows) == 24, done.stdout
  seen = set()
  for memory, shape, dtype, impl, passes, ms, rate, xla_peak, _, _, vs_xla in (
      [c.strip() for c in row] for row in rows):
    assert shape == "2-64-128-2-16" and not ms.startswith("failed"), (memory, impl, passes, ms)
    assert float(ms) > 0 and float(xla_peak) >= 0
    # M tokens/s is B * T over the time (both rounded in the table).
    assert abs(float(rate) - 128 / float(ms) / 1e3) <= 0.01, (ms, rate)
    assert (vs_xla == "") == (impl == "memjax xla"), (impl, vs_xla)
    seen.add((memory, dtype, impl, passes))
  assert len(seen) == 24
  diffs = dict(re.findall(r"(\w+ \S+ \w+: \w+) vs xla forward, relative difference (\S+)",
                          done.stdout))
  assert set(diffs) == {f"{m} 2-64-128-2-16 {d}: {impl}" for m in ("linear", "mlp")
                        for d in ("float32", "bfloat16") for impl in ("reference", "pallas")
                        }, done.stdout
  for name, diff in diffs.items():
    assert float(diff) < (1e-4 if "float32" in name else 2e-2), (name, diff)
