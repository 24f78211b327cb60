"""Smoke tests: the Hopfield experiment and examples run in small mode, as a user runs them,
and their results make sense."""

import json
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent


def _run(relative: str, *flags: str) -> str:
  done = subprocess.run([sys.executable, str(ROOT / relative), "--small", *flags],
                        capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def test_capacity_experiment(tmp_path):
  _run("experiments/hopfield_capacity.py", f"--workdir={tmp_path}")
  assert os.path.getsize(tmp_path / "capacity.png") > 0
  with open(tmp_path / "results.json") as f:
    rows = json.load(f)["rows"]
  crowded = rows[-1]
  # Far beyond the classical capacity (0.138 d ~ 2): the classical network fails as its
  # theory says; the modern ones still retrieve almost every bit.
  assert crowded["classical"] > 0.1
  assert abs(crowded["classical"] - crowded["theory_classical"]) < 0.08
  assert max(crowded["dense"], crowded["sparse"]) < crowded["classical"] / 4


def test_bit_pattern_example():
  out = _run("examples/hopfield_bit_patterns.py")
  accuracy = [float(a) for a in re.findall(r"hidden half: ([0-9.]+)", out)]
  assert len(accuracy) == 2, out
  assert accuracy[1] == 1.0 and accuracy[0] < 0.9  # Large beta retrieves, tiny beta mixes.


def test_mil_example():
  out = _run("examples/hopfield_mil.py")
  accuracy = float(re.search(r"held-out accuracy ([0-9.]+)", out).group(1))
  assert accuracy > 0.65, out
