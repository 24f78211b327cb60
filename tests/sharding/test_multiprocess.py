"""Two processes of experiments/train.py on localhost train exactly as one process does.

Each process has 4 virtual CPU devices and talks to the other through JAX's CPU
collectives (gloo); together they form the mesh {"data": 4, "fsdp": 2} that a single
process makes of 8 devices. Each reads only its half of every batch, so the losses and
held-out metrics equal the single process's only if the halves make up the same global
batches. The run stops at step 6 and is resumed to step 9 from its checkpoint.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import portpicker
import pytest

_REPO = os.path.join(os.path.dirname(__file__), "..", "..")
_TIMEOUT_S = 240
# The tiny MQAR config, logging every step; the schedule's horizon is fixed so that the
# 6-step run and its resumption to 9 see the learning rates of the 9-step run.
_FLAGS = [
    "--config=experiments/configs/mqar.py:tiny",
    "--config.data.source=numpy",
    "--config.model.implementation=reference",
    "--config.train.log_every=1",
    "--config.train.eval_every=3",
    "--config.train.checkpoint_every=3",
    "--config.train.decay_steps=9",
    "--config.mesh.data=4",
    "--config.mesh.fsdp=2",
]

pytestmark = pytest.mark.skipif(
    not hasattr(jax.config, "jax_cpu_collectives_implementation"),
    reason="this JAX has no CPU collectives (jax_cpu_collectives_implementation), so "
           "processes cannot share a computation on CPU devices",
)


def _launch(workdir, num_steps, devices, extra=()):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices),
         "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
  command = [sys.executable, "experiments/train.py", *_FLAGS,
             f"--config.train.num_steps={num_steps}", f"--workdir={workdir}", *extra]
  return subprocess.Popen(command, cwd=_REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _finish(processes):
  """Waits for every process; returns their outputs; fails (killing the rest) on errors."""
  outputs = []
  try:
    for process in processes:
      output, _ = process.communicate(timeout=_TIMEOUT_S)
      assert process.returncode == 0, f"exit code {process.returncode}:\n{output[-4000:]}"
      outputs.append(output)
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
  return outputs


def _run_two_processes(workdir, num_steps):
  address = f"localhost:{portpicker.pick_unused_port()}"
  return _finish([
      _launch(workdir, num_steps, devices=4,
              extra=(f"--coordinator_address={address}", "--num_processes=2",
                     f"--process_id={process_id}"))
      for process_id in (0, 1)
  ])


def _metrics(workdir):
  """{(step, name): value} of metrics.jsonl, failing if a step wrote a name twice."""
  values = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      step = row.pop("step")
      for name, value in row.items():
        assert (step, name) not in values, f"{name} written twice at step {step}"
        values[step, name] = value
  return values


def test_two_processes_train_and_resume_as_one(tmp_path):
  single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
  _finish([_launch(single, 9, devices=8)])
  first = _run_two_processes(multi, 6)
  resumed = _run_two_processes(multi, 9)

  # Process 0 alone reports; both took part in every step and checkpoint.
  assert "step 6/6" in first[0] and "step 6/6" not in first[1]
  assert "resumed from step 6" in resumed[0] and "step 9/9" in resumed[0]
  assert "step 9/9" not in resumed[1]
  assert sorted(os.listdir(os.path.join(multi, "checkpoints"))) == ["3", "6", "9"]
  assert len([f for f in os.listdir(multi) if f.startswith("events.out.tfevents")]) == 2

  want, got = _metrics(single), _metrics(multi)
  compared = [key for key in want if not key[1].endswith("tokens_per_s")]
  # The single run evaluates at step 6 mid-run, the first two-process run at its end.
  assert sorted(key for key in got if not key[1].endswith("tokens_per_s")) == sorted(compared)
  assert {step for step, name in compared if name == "train/loss"} == set(range(1, 10))
  for key in compared:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=str(key))
