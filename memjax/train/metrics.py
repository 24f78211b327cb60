"""Writes scalar metrics to TensorBoard event files and to a JSONL file."""

import json
import os
from typing import Mapping

import tensorboardX

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
  """Writes each call's scalars to both sinks in the workdir.

  `metrics.jsonl` gets one JSON object per call, `{"step": ..., name: value}`;
  it is appended to, so a resumed run continues the file of the first one.

  Args:
    workdir: Directory for the event files and `metrics.jsonl`.
  """

  def __init__(self, workdir: str):
    os.makedirs(workdir, exist_ok=True)
    self._summary = tensorboardX.SummaryWriter(logdir=workdir)
    self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a")

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    """Writes scalars for one step and flushes both sinks.

    Args:
      step: The x-axis value, the number of train steps done.
      scalars: Names (e.g. "train/loss") to numbers.
    """
    scalars = {name: float(value) for name, value in scalars.items()}
    for name, value in scalars.items():
      self._summary.add_scalar(name, value, global_step=step)
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    # Flushed on every write so that a run killed mid-way keeps its curve.
    self._jsonl.flush()
    self._summary.flush()

  def close(self) -> None:
    """Closes both sinks."""
    self._summary.close()
    self._jsonl.close()
