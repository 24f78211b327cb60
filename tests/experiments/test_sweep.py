"""Tests of the sweep and plot binaries: the grid syntax, run names, a tiny sweep that
resumes by skipping its finished runs, and the grouping and drawing of its CSV."""

import importlib.util
import os
import pathlib
import subprocess
import sys

from absl import flags
import pytest

from tests.train.test_loop import _config

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent


def _load(name):
  """The module of experiments/<name>.py."""
  spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


sweep = _load("sweep")
# Both binaries define --csv, and a binary's process holds only its own flags; this
# one imports both, so plot's definition replaces sweep's (whose main is not run here).
delattr(flags.FLAGS, "csv")
plot = _load("plot")

# The tiny MQAR config of tests/train/test_loop.py cut to a handful of steps.
_OVERRIDES = {
    "data.source": "numpy",
    "model.implementation": "reference",
    "train.num_steps": 6,
    "train.warmup_steps": 2,
    "train.log_every": 3,
    "train.eval_every": 6,
    "train.checkpoint_every": 6,
}
_GRID = ["model.mixers=attn|gdn", "model.d_model=32"]


def _tiny_config():
  config = _config("mqar", "tiny")
  for field, value in _OVERRIDES.items():
    section, name = field.split(".")
    config[section][name] = value
  return config


def test_grid_parses_values_to_the_fields_types():
  grid = sweep.parse_grid(
      [
          "model.mixers=attn,attn|gdn,gdn",
          "model.d_model=64,128|256; train.learning_rate=1e-3",
          "model.tie_embeddings=true|False;model.implementation=xla",
      ],
      _config("mqar", "tiny"),
  )
  assert grid == {
      # A string value keeps its commas: the mixer spec of a two-layer model.
      "model.mixers": ["attn,attn", "gdn,gdn"],
      "model.d_model": [64, 128, 256],
      "train.learning_rate": [1e-3],
      "model.tie_embeddings": [True, False],
      # A placeholder has the type it was declared with.
      "model.implementation": ["xla"],
  }
  assert [type(v) for v in grid["model.d_model"]] == [int] * 3
  assert len(sweep.grid_points(grid)) == 12
  assert sweep.grid_points(grid)[:2] == [
      {**{f: v[0] for f, v in grid.items()}, "model.tie_embeddings": b}
      for b in (True, False)
  ]


@pytest.mark.parametrize(
    "entry, match",
    [
        ("model.width=64", "model.width is not a field"),
        ("optim.lr=1", "optim.lr is not a field"),
        ("model.d_model.x=1", "model.d_model.x is not a field"),
        ("model.d_model=64,wide", "model.d_model takes int values, got 'wide'"),
        ("model.d_model=64,,128", "model.d_model has an empty value"),
        ("model.tie_embeddings=yes", "model.tie_embeddings is a bool"),
        ("model.d_model=64;model.d_model=128", "model.d_model is given twice"),
        ("model.d_model", "must be `field=values`"),
        ("", "grid has no fields"),
    ],
)
def test_bad_grids_raise_naming_the_field(entry, match):
  with pytest.raises(ValueError, match=match):
    sweep.parse_grid([entry], _config("mqar", "tiny"))


def test_run_names_are_short_unique_and_filesystem_safe():
  point = {"model.mixers": "gdn,attn", "model.d_model": 64, "train.learning_rate": 0.001}
  assert sweep.run_name(point) == "mixers-gdn_attn__d_model-64__learning_rate-0.001"
  # Fields that end alike keep their paths.
  assert sweep.run_name({"model.seq_len": 8, "data.seq_len": 16}) == (
      "model.seq_len-8__data.seq_len-16"
  )
  with pytest.raises(ValueError, match="duplicate run names"):
    sweep.sweep(
        _tiny_config(), {"model.mixers": ["gdn,attn", "gdn attn"]}, "/unused", "/unused.csv"
    )


def test_configure_copies_and_keeps_shared_fields_shared():
  base = _config("mqar", "tiny")
  base.lock()
  config = sweep.configure(base, {"data.vocab_size": 128, "model.d_model": 48})
  assert (config.model.vocab_size, config.data.vocab_size, config.model.d_model) == (
      128, 128, 48
  )
  assert (base.model.vocab_size, base.model.d_model) == (64, 32)


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
  """A two-run sweep of the tiny config: (workdir, csv path, names it trained)."""
  workdir = tmp_path_factory.mktemp("sweep")
  csv_path = workdir / "results.csv"
  grid = sweep.parse_grid(_GRID, _tiny_config())
  return workdir, csv_path, sweep.sweep(_tiny_config(), grid, str(workdir), str(csv_path))


def test_sweep_trains_every_point_and_writes_one_row_each(tiny_sweep):
  workdir, csv_path, trained = tiny_sweep
  assert trained == ["mixers-attn__d_model-32", "mixers-gdn__d_model-32"]
  rows = plot.read_rows(str(csv_path))
  assert list(rows[0]) == [
      "model.mixers", "model.d_model", "eval/accuracy", "eval/loss",
      "eval/exact_match", "wall_seconds",
  ]
  assert [(r["model.mixers"], r["model.d_model"]) for r in rows] == [
      ("attn", "32"), ("gdn", "32")
  ]
  for row, name in zip(rows, trained):
    assert 0.0 <= float(row["eval/accuracy"]) <= 1.0
    assert float(row["wall_seconds"]) > 0
    assert (workdir / name / "metrics.jsonl").exists()


def test_rerunning_the_binary_skips_finished_runs(tiny_sweep):
  workdir, csv_path, _ = tiny_sweep
  before = csv_path.read_text()
  done = subprocess.run(
      [sys.executable, str(ROOT / "experiments/sweep.py"),
       "--config=experiments/configs/mqar.py:tiny", f"--workdir={workdir}",
       f"--grid={';'.join(_GRID)}",
       *(f"--config.{field}={value}" for field, value in _OVERRIDES.items())],
      capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "[2/2] mixers-gdn__d_model-32: in" in done.stdout
  assert "0 runs trained, 2 skipped" in done.stdout, done.stdout
  assert csv_path.read_text() == before


def test_eval_seq_lens_score_each_run_at_other_lengths(tmp_path):
  """S-NIAH trained at 128 tokens, scored at 128 and 256; a run whose scores are missing
  is evaluated again without retraining."""
  config = _config("sniah", "tiny")
  config.data.source = "numpy"
  config.model.implementation = "reference"
  grid = sweep.parse_grid(["model.mixers=gdn|swa", "data.needle=passkey"], config)
  config.model.attention_window = 32
  csv_path = tmp_path / "results.csv"
  run = lambda: sweep.sweep(config, grid, str(tmp_path), str(csv_path),
                            eval_seq_lens=[128, 256], eval_batch_size=4)
  assert run() == ["mixers-gdn__needle-passkey", "mixers-swa__needle-passkey"]
  eval_path = tmp_path / sweep.EVAL_LENGTHS_FILE
  rows = plot.read_rows(str(eval_path))
  assert list(rows[0]) == ["model.mixers", "data.needle", "step", "eval_seq_len",
                           "eval/accuracy", "eval/loss", "eval/exact_match"]
  assert [(r["model.mixers"], r["eval_seq_len"], r["step"]) for r in rows] == [
      ("gdn", "128", "4"), ("gdn", "256", "4"), ("swa", "128", "4"), ("swa", "256", "4")]
  # At the trained length the score is the training run's own final evaluation (the loss
  # up to the summation order of another batch size).
  trained = plot.read_rows(str(csv_path))
  assert rows[0]["eval/exact_match"] == trained[0]["eval/exact_match"]
  assert float(rows[0]["eval/loss"]) == pytest.approx(float(trained[0]["eval/loss"]), 1e-6)
  # Scores lost, training rows kept: evaluated again, nothing retrained.
  eval_path.unlink()
  before = csv_path.read_text()
  assert run() == []
  assert len(plot.read_rows(str(eval_path))) == 4
  assert csv_path.read_text() == before


def test_workers_share_the_grid_and_write_each_row_once(tmp_path):
  grid = ["model.mixers=attn|gdn|linear", "model.d_model=32"]
  done = subprocess.run(
      [sys.executable, str(ROOT / "experiments/sweep.py"),
       "--config=experiments/configs/mqar.py:tiny", f"--workdir={tmp_path}",
       f"--grid={';'.join(grid)}", "--workers=2",
       *(f"--config.{field}={value}" for field, value in _OVERRIDES.items())],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "2 workers done" in done.stdout, done.stdout
  rows = plot.read_rows(str(tmp_path / "results.csv"))
  assert sorted(r["model.mixers"] for r in rows) == ["attn", "gdn", "linear"]
  # Every run was trained by exactly one worker.
  trained = [line for line in done.stdout.splitlines() if ": training in " in line]
  assert len(trained) == 3, done.stdout
  assert sorted(os.listdir(tmp_path / ".claims")) == [
      "mixers-attn__d_model-32", "mixers-gdn__d_model-32", "mixers-linear__d_model-32"
  ]


def test_worker_devices_must_match_the_workers():
  with pytest.raises(ValueError, match="one device per worker: 2 workers"):
    sweep.run_workers({"model.d_model": [32]}, "/unused", "/unused.csv", [], 2, ["0"])


def test_a_csv_of_another_grid_is_refused(tiny_sweep):
  workdir, csv_path, _ = tiny_sweep
  with pytest.raises(ValueError, match="results.csv has columns"):
    sweep.sweep(_tiny_config(), {"model.d_model": [32]}, str(workdir), str(csv_path))


_ROWS = [
    {"model.mixers": m, "model.d_model": d, "data.seq_len": s, "eval/accuracy": a}
    for m, d, s, a in [
        ("gdn", "128", "256", "0.9"), ("gdn", "64", "256", "0.5"),
        ("attn", "64", "256", "1.0"), ("gdn", "64", "512", "0.25"),
    ]
]


def test_rows_group_into_panels_and_sorted_lines():
  groups = plot.group_rows(_ROWS, "model.d_model", "model.mixers", ["data.seq_len"],
                           "eval/accuracy")
  assert groups == {
      ("256",): {"gdn": [(64.0, 0.5), (128.0, 0.9)], "attn": [(64.0, 1.0)]},
      ("512",): {"gdn": [(64.0, 0.25)]},
  }
  assert list(groups[("256",)]) == ["gdn", "attn"]  # The order of the sweep.
  assert plot.panel_title(["data.seq_len", "data.num_kv_pairs"], ("256", "16")) == (
      "seq_len=256, num_kv_pairs=16"
  )
  # Context length on x, one panel.
  narrow = [row for row in _ROWS if row["model.d_model"] == "64"]
  assert plot.group_rows(narrow, "data.seq_len", "model.mixers", [], "eval/accuracy") == {
      (): {"gdn": [(256.0, 0.5), (512.0, 0.25)], "attn": [(256.0, 1.0)]}
  }
  with pytest.raises(ValueError, match="add the column they differ in"):
    plot.group_rows(_ROWS, "model.d_model", "model.mixers", [], "eval/accuracy")


@pytest.mark.parametrize(
    "x, series, metric, match",
    [
        ("model.width", "model.mixers", "eval/accuracy", "x names"),
        ("model.d_model", "mixer", "eval/accuracy", "series names"),
        ("model.d_model", "model.mixers", "eval/f1", "metric names"),
        ("model.mixers", "model.d_model", "eval/accuracy", "x column model.mixers"),
    ],
)
def test_bad_columns_raise_naming_the_argument(x, series, metric, match):
  with pytest.raises(ValueError, match=match):
    plot.group_rows(_ROWS, x, series, ["data.seq_len"], metric)


def test_output_path():
  assert plot.output_path("/a/fig.png", "/s/results.csv", "model.d_model", "eval/accuracy") == (
      "/a/fig.png"
  )
  assert plot.output_path(None, "/s/results.csv", "data.seq_len", "eval/exact_match") == (
      "/s/exact_match_vs_seq_len.png"
  )
  assert plot.output_path("/figs", "/s/results.csv", "model.d_model", "eval/accuracy") == (
      "/figs/accuracy_vs_d_model.png"
  )


def test_plot_writes_a_png(tiny_sweep, tmp_path):
  pytest.importorskip("matplotlib")
  _, csv_path, _ = tiny_sweep
  rows = plot.read_rows(str(csv_path))
  path = plot.output_path(str(tmp_path / "figs"), str(csv_path), "model.d_model",
                          "eval/accuracy")
  plot.draw(plot.group_rows(rows, "model.d_model", "model.mixers", [], "eval/accuracy"),
            path, x="model.d_model", panel=[], metric="eval/accuracy")
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
