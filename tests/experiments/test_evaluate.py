"""Tests of the length-generalisation evaluation: a tiny S-NIAH run is restored and
scored at its trained length (which must repeat its final metrics exactly) and at a
longer one, in process and through the experiments/evaluate.py binary."""

import csv
import math
import pathlib
import shutil
import subprocess
import sys

import pytest

from memjax.train import evaluation
from memjax.train import train_and_evaluate
from tests.train.test_loop import _config

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
METRICS = ("eval/loss", "eval/accuracy", "eval/exact_match")


def _tiny_config():
  """The `tiny` S-NIAH config (128-token contexts, 4 steps) on in-memory data."""
  config = _config("sniah", "tiny")
  config.data.source = "numpy"
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished tiny run: (workdir, config, final metrics of train_and_evaluate)."""
  workdir = tmp_path_factory.mktemp("sniah_run")
  config = _tiny_config()
  return workdir, config, train_and_evaluate(config, str(workdir))


def _assert_repeats(row, final):
  """The row's metrics are the run's final ones: counts exactly, the loss to 1e-6."""
  assert row["eval/accuracy"] == final["eval/accuracy"]
  assert row["eval/exact_match"] == final["eval/exact_match"]
  assert math.isclose(row["eval/loss"], final["eval/loss"], rel_tol=0, abs_tol=1e-6)


def test_the_trained_length_repeats_the_final_metrics(trained):
  workdir, config, final = trained
  run = evaluation.restore_run(str(workdir))
  assert (run.step, run.model.mixers) == (config.train.num_steps, "gdn")
  rows = evaluation.evaluate_lengths(
      run, config.data, [128, 256], batch_size=config.train.batch_size
  )
  assert [(r["data.seq_len"], r["data.needle"]) for r in rows] == [
      (128, "passkey"), (256, "passkey")
  ]
  assert list(rows[0]) == [
      "model.mixers", "step", "data.seq_len", "data.needle", *METRICS
  ]
  _assert_repeats(rows[0], final)
  assert all(math.isfinite(rows[1][m]) for m in METRICS)
  # The sum over examples does not depend on how they are batched.
  (again,) = evaluation.evaluate_lengths(run, config.data, [256], batch_size=3)
  assert again["eval/accuracy"] == rows[1]["eval/accuracy"]


@pytest.mark.parametrize(
    "seq_lens, needles, batch_size, match",
    [
        ([], None, 8, "seq_lens must hold at least one length"),
        ([128, 128], None, 8, "seq_lens must be distinct"),
        ([0], None, 8, "seq_lens must be distinct lengths >= 1"),
        ([128], ["passkey", "haystack"], 8, "needles must be distinct names"),
        ([128], [], 8, "needles must be distinct names"),
        ([128], None, 0, "batch_size must be >= 1"),
        # Too short for the number needle; fails before anything is scored.
        ([256, 128], ["number"], 8, "context_length=128 is too short"),
    ],
)
def test_bad_arguments_raise_naming_them(trained, seq_lens, needles, batch_size, match):
  workdir, config, _ = trained
  run = evaluation.restore_run(str(workdir))
  with pytest.raises(ValueError, match=match):
    evaluation.evaluate_lengths(
        run, config.data, seq_lens, needles=needles, batch_size=batch_size
    )


def test_another_task_is_refused(trained):
  workdir, _, _ = trained
  run = evaluation.restore_run(str(workdir))
  with pytest.raises(ValueError, match="task 'mqar' but the run .* trained on 'sniah'"):
    evaluation.evaluate_lengths(run, _config("mqar", "tiny").data, [32], batch_size=8)


def test_a_workdir_without_a_checkpoint_is_named(trained, tmp_path):
  workdir, _, _ = trained
  with pytest.raises(ValueError, match=f"workdir '{tmp_path}' has no config.json"):
    evaluation.restore_run(str(tmp_path))
  shutil.copy(workdir / "config.json", tmp_path / "config.json")
  with pytest.raises(ValueError, match=f"workdir '{tmp_path}' has no checkpoint directory"):
    evaluation.restore_run(str(tmp_path))
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(ValueError, match=f"workdir '{tmp_path}' has no checkpoint in"):
    evaluation.restore_run(str(tmp_path))


def test_the_binary_writes_the_table_from_tfds_data(trained, tmp_path):
  workdir, config, final = trained
  output = tmp_path / "lengths.csv"
  # The config file's TFDS source: the same test examples as the run's numpy ones.
  done = subprocess.run(
      [sys.executable, str(ROOT / "experiments/evaluate.py"),
       "--config=experiments/configs/sniah.py:tiny", f"--workdir={workdir}",
       "--seq_lens=128", f"--output={output}"],
      capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "data.seq_len  data.needle  eval/loss" in done.stdout, done.stdout
  with open(output, newline="") as f:
    (row,) = list(csv.DictReader(f))
  assert (row["data.seq_len"], row["data.needle"], row["step"]) == (
      "128", "passkey", str(config.train.num_steps)
  )
  _assert_repeats({m: float(row[m]) for m in METRICS}, final)


def test_the_binary_refuses_a_length_that_is_no_integer(trained):
  workdir, _, _ = trained
  done = subprocess.run(
      [sys.executable, str(ROOT / "experiments/evaluate.py"), f"--workdir={workdir}",
       "--seq_lens=128,long"],
      capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert done.returncode != 0
  assert "ValueError: --seq_lens takes integers, got ['128', 'long']" in done.stderr
