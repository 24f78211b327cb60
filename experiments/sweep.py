r"""Runs a grid of training runs from one config, one after another, into one CSV.

Each `--grid` entry is `<dotted config field>=<values>`; several entries go in one
flag separated by `;` or in repeated `--grid` flags. Values are parsed to the
field's type in the config (int, float, bool as true/false, or str) and are
separated by `|`. Numbers and bools may also be separated by `,`; a string
field's values are split at `|` only, since a value such as the mixer spec
`gdn,gdn` holds commas itself: `model.mixers=attn,attn|gdn,gdn` is two values,
`model.mixers=attn,gdn` is one (a two-layer hybrid). The grid is every
combination of the values, the last field varying fastest.

Each run trains in `<workdir>/<run name>`, its name built from its grid values
(`mixers-attn_attn__d_model-64__seq_len-256__num_kv_pairs-16`), and appends
one row to the CSV (default `<workdir>/results.csv`): the grid fields' values,
the final "eval/accuracy", "eval/loss" and "eval/exact_match", and the wall
seconds of that call (compilation and evaluation included). Rerunning the same
command skips every run whose row is in the CSV and resumes a run cut off
mid-way from its checkpoints. From the repo root, Zoology's MQAR figure (four
mixers x three widths x three task settings, 36 runs; each dataset is built once
in the shared data_dir, named after its parameters):

  python experiments/sweep.py --config=experiments/configs/mqar.py:gpu \
      --grid='model.mixers=attn,attn|linear,linear|deltanet,deltanet|gdn,gdn' \
      --grid='model.d_model=64,128,256' \
      --grid='data.seq_len=256;data.num_kv_pairs=16,64' \
      --config.data.data_dir=/tmp/memjax/zoology/tfds --workdir=/tmp/memjax/zoology
  python experiments/sweep.py --config=experiments/configs/mqar.py:gpu \
      --grid='model.mixers=attn,attn|linear,linear|deltanet,deltanet|gdn,gdn' \
      --grid='model.d_model=64,128,256' \
      --grid='data.seq_len=512;data.num_kv_pairs=64' \
      --config.data.data_dir=/tmp/memjax/zoology/tfds --workdir=/tmp/memjax/zoology

The two commands share the workdir and so one CSV, the second adding the
(512, 64) setting (a grid is a full product, and (512, 16) is not in the
figure); plot it with experiments/plot.py. S-NIAH accuracy against the
context length:

  python experiments/sweep.py --config=experiments/configs/sniah.py \
      --grid='model.mixers=attn,attn|gdn,gdn;data.seq_len=512,1024,2048,4096' \
      --config.data.data_dir=/tmp/memjax/sniah_sweep/tfds \
      --workdir=/tmp/memjax/sniah_sweep

`--eval_seq_lens` also scores each run, once trained, at other lengths (the Titans
S-NIAH protocol: train on 1K, score at 1K-8K) into `eval_lengths.csv` beside the CSV;
Gated DeltaNet, Titans LMM and sliding-window attention on the three needles:

  python experiments/sweep.py --config=experiments/configs/sniah.py \
      --grid='model.mixers=gdn,gdn,gdn,gdn|lmm,lmm,lmm,lmm|swa,swa,swa,swa' \
      --grid='data.needle=passkey|number|word' --config.model.d_model=256 \
      --config.model.num_heads=4 --config.model.attention_window=256 \
      --config.data.source=numpy --eval_seq_lens=1024,2048,4096,8192 \
      --eval_batch_size=8 --workdir=/tmp/memjax/sniah_lengths
  python experiments/plot.py --csv=/tmp/memjax/sniah_lengths/eval_lengths.csv \
      --x=eval_seq_len --series=model.mixers --panel=data.needle \
      --metric=eval/exact_match

`--config.<section>.<field>=<value>` overrides the base config as in
experiments/train.py, e.g. `--config.train.num_steps=3000`.

`--workers=N` trains N runs at a time, each worker a process of its own that takes
the next run no other worker has claimed; on a host with N GPUs add
`--worker_devices=0,1,...` to give each worker one GPU. The sequence-256 half of the
MQAR figure with the memory layers added, on an 8-GPU host:

  python experiments/sweep.py --config=experiments/configs/mqar.py:gpu \
      --grid='model.mixers=attn,attn|linear,linear|deltanet,deltanet|gdn,gdn|lmm,lmm|mom,mom' \
      --grid='model.d_model=64,128,256' --grid='data.seq_len=256;data.num_kv_pairs=16,64' \
      --workers=8 --worker_devices=0,1,2,3,4,5,6,7 --workdir=/tmp/memjax/zoology
"""

import copy
import csv
import fcntl
import itertools
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from memjax.train import evaluation
from memjax.train import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "mqar.py"),
    "Base config file, optionally with `:variant`.",
    lock_config=True,
)
_GRID = flags.DEFINE_multi_string(
    "grid",
    [],
    "`field=v1|v2|...` entries, `;`-separated or repeated; see the module docstring.",
)
_WORKDIR = flags.DEFINE_string(
    "workdir", "/tmp/memjax/sweep", "Each run goes to <workdir>/<run name>."
)
_CSV = flags.DEFINE_string(
    "csv", None, "The results table; None means <workdir>/results.csv."
)
_WORKERS = flags.DEFINE_integer(
    "workers", 1, "Runs trained at the same time, each in its own process."
)
_WORKER_DEVICES = flags.DEFINE_list(
    "worker_devices",
    None,
    "One CUDA_VISIBLE_DEVICES value per worker (e.g. `0,1,2,3`): one GPU each. "
    "None leaves the devices to the workers (CPU runs).",
)
_EVAL_SEQ_LENS = flags.DEFINE_list(
    "eval_seq_lens",
    None,
    "Also score each run's held-out split at these lengths after it trains (the "
    "S-NIAH length-generalisation protocol of experiments/evaluate.py); rows go to "
    "<csv's folder>/eval_lengths.csv.",
)
_EVAL_BATCH_SIZE = flags.DEFINE_integer(
    "eval_batch_size", None, "Batch of --eval_seq_lens; None: the run's train.batch_size."
)
_WORKER_INDEX = flags.DEFINE_integer(
    "worker_index", -1, "Set by the sweep for the processes it starts; not for users."
)

METRICS = ("eval/accuracy", "eval/loss", "eval/exact_match")
WALL_SECONDS = "wall_seconds"
EVAL_LENGTHS_FILE = "eval_lengths.csv"
# The column of the evaluated length in eval_lengths.csv: "data.seq_len" may be a grid
# field (the trained length).
EVAL_SEQ_LEN = "eval_seq_len"
_SWEPT_TYPES = (bool, int, float, str)


def parse_grid(entries: Sequence[str], config: Any) -> dict[str, list[Any]]:
  """Parses `--grid` entries into typed values per config field.

  Args:
    entries: Strings of `;`-separated `field=values` items, e.g.
      ["model.mixers=attn,attn|gdn,gdn", "model.d_model=64,128;data.seq_len=256"].
    config: The base ConfigDict; every field must exist in it and gives the
      type its values are parsed to.

  Returns:
    {dotted field: [values]}, in the order the fields were given.

  Raises:
    ValueError: for an item without `=`, a field named twice, a field not in
      the config or of a type other than int, float, bool or str, or a value
      that is empty or does not parse; the message names the field.
  """
  grid = {}
  for item in (i for entry in entries for i in entry.split(";") if i.strip()):
    field, sep, text = item.partition("=")
    field = field.strip()
    if not sep:
      raise ValueError(f"grid item {item!r} must be `field=values`.")
    if field in grid:
      raise ValueError(f"grid field {field} is given twice.")
    kind = _field_type(config, field)
    # A string value may hold commas itself (mixer specs); numbers cannot.
    texts = text.split("|") if kind is str else re.split(r"[|,]", text)
    grid[field] = [_parse_value(t.strip(), kind, field) for t in texts]
  if not grid:
    raise ValueError("grid has no fields; give at least one `--grid=field=values`.")
  return grid


def _field_type(config: Any, field: str) -> type:
  """The type of `config`'s dotted `field`; ValueError naming it if absent."""
  *sections, name = field.split(".")
  node = config
  for section in sections:
    node = node.get(section) if hasattr(node, "get_type") else None
  if not hasattr(node, "get_type") or name not in node:
    raise ValueError(f"grid field {field} is not a field of the config.")
  kind = node.get_type(name)
  if kind not in _SWEPT_TYPES:
    raise ValueError(
        f"grid field {field} has type {kind.__name__}; only int, float, bool "
        "and str fields can be swept."
    )
  return kind


def _parse_value(text: str, kind: type, field: str) -> Any:
  """Parses one value of a grid field to the field's type."""
  if not text:
    raise ValueError(f"grid field {field} has an empty value.")
  if kind is bool:
    if text.lower() not in ("true", "false"):
      raise ValueError(f"grid field {field} is a bool: true or false, got {text!r}.")
    return text.lower() == "true"
  try:
    return kind(text)
  except ValueError:
    raise ValueError(
        f"grid field {field} takes {kind.__name__} values, got {text!r}."
    ) from None


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
  """Every combination of the grid's values, the last field varying fastest.

  Args:
    grid: {dotted field: [values]}, as from `parse_grid`.

  Returns:
    One {dotted field: value} per run.
  """
  return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def run_name(point: dict[str, Any]) -> str:
  """The directory name of a run: `<field>-<value>` items joined by `__`.

  A field is named by its last component (`d_model`) unless another grid field
  ends the same way (`model.seq_len` and `data.seq_len` keep their paths).
  Every character outside `[A-Za-z0-9.-]` becomes `_`, so the name is safe on
  any filesystem.

  Args:
    point: {dotted field: value} of one run.

  Returns:
    The run name.
  """
  leaves = [field.rsplit(".", 1)[-1] for field in point]
  parts = []
  for (field, value), leaf in zip(point.items(), leaves):
    label = leaf if leaves.count(leaf) == 1 else field
    parts.append(f"{label}-{value}")
  return "__".join(re.sub(r"[^A-Za-z0-9.-]+", "_", part) for part in parts)


def configure(base: Any, point: dict[str, Any]) -> Any:
  """A copy of `base` with the run's fields set; `base` is left as it was.

  Args:
    base: The base ConfigDict. It may stay locked: the fields exist already.
    point: {dotted field: value}, as from `grid_points`.

  Returns:
    The run's ConfigDict. Fields that share a FieldReference (the MQAR
    configs' vocab_size) change together, as with a `--config.` flag.
  """
  config = copy.deepcopy(base)
  for field, value in point.items():
    *sections, name = field.split(".")
    node = config
    for section in sections:
      node = node[section]
    node[name] = value
  return config


def sweep(
    base: Any,
    grid: dict[str, list[Any]],
    workdir: str,
    csv_path: str,
    *,
    shared: bool = False,
    eval_seq_lens: Sequence[int] | None = None,
    eval_batch_size: int | None = None,
) -> list[str]:
  """Trains every grid point missing from the CSV and appends its row.

  Args:
    base: The base ConfigDict.
    grid: {dotted field: [values]}, as from `parse_grid`.
    workdir: Run `name` trains in `<workdir>/<name>`.
    csv_path: The results table, created with a header if absent.
    shared: Other processes run the same sweep at the same time (the workers
      of `run_workers`): a run is trained only by the process that claims it
      first, with a file in `<workdir>/.claims`.
    eval_seq_lens: None, or lengths at which each run is also scored after it trains
      (`memjax.train.evaluation.evaluate_lengths`). Their rows, the grid values then
      "step", `EVAL_SEQ_LEN` and the metrics, go to `eval_lengths.csv` beside the CSV. A
      run with its training row but none there is only evaluated.
    eval_batch_size: Batch of those evaluations; None: the run's train.batch_size.

  Returns:
    The names of the runs trained by this call (not the skipped ones).

  Raises:
    ValueError: if two grid points get the same run name, or the CSV's header
      is not this grid's (the table of another sweep).
  """
  points = grid_points(grid)
  names = [run_name(point) for point in points]
  if len(set(names)) != len(names):
    raise ValueError(f"grid values give duplicate run names: {names}.")
  columns = [*grid, *METRICS, WALL_SECONDS]
  done = _finished_runs(csv_path, columns, list(grid))
  eval_path = os.path.join(os.path.dirname(os.path.abspath(csv_path)), EVAL_LENGTHS_FILE)
  eval_columns = [*grid, "step", EVAL_SEQ_LEN, *METRICS]
  evaluated = (_finished_runs(eval_path, eval_columns, list(grid)) if eval_seq_lens
               else None)
  trained = []
  for i, (point, name) in enumerate(zip(points, names), start=1):
    progress = f"[{i}/{len(points)}] {name}"
    to_evaluate = evaluated is not None and _row_key(point) not in evaluated
    if _row_key(point) in done and not to_evaluate:
      print(f"{progress}: in {csv_path}, skipped", flush=True)
      continue
    if shared and not _claim(workdir, name):
      print(f"{progress}: taken by another worker", flush=True)
      continue
    run_dir = os.path.join(workdir, name)
    config = configure(base, point)
    if _row_key(point) in done:
      print(f"{progress}: trained; evaluating at {list(eval_seq_lens)}", flush=True)
      _evaluate_lengths(config, run_dir, point, eval_seq_lens, eval_batch_size, eval_path,
                        eval_columns)
      continue
    print(f"{progress}: training in {run_dir}", flush=True)
    start = time.perf_counter()
    final = train_and_evaluate(config, run_dir)
    seconds = time.perf_counter() - start
    _append_row(
        csv_path,
        columns,
        [*_row_key(point), *(final[m] for m in METRICS), f"{seconds:.1f}"],
    )
    trained.append(name)
    scores = "  ".join(f"{m} {final[m]:.4f}" for m in METRICS)
    print(f"{progress}: {scores}  {seconds:.1f} s", flush=True)
    if to_evaluate:
      _evaluate_lengths(config, run_dir, point, eval_seq_lens, eval_batch_size, eval_path,
                        eval_columns)
  print(f"{len(trained)} runs trained, {len(points) - len(trained)} skipped; "
        f"results in {csv_path}", flush=True)
  return trained


def run_workers(
    grid: dict[str, list[Any]],
    workdir: str,
    csv_path: str,
    worker_args: Sequence[str],
    workers: int,
    devices: Sequence[str] | None = None,
) -> None:
  """Runs the sweep in `workers` processes that share its grid, one run each at a time.

  Each worker is this binary with `worker_args` and its `--worker_index`; it
  walks the grid in order and trains every run no one has claimed, so runs of
  different cost balance over the workers by themselves. On a multi-GPU host,
  `devices` gives each worker its own GPU: small models rarely fill one, and
  processes sharing a GPU wait on each other's kernels.

  Args:
    grid: {dotted field: [values]}, as from `parse_grid`.
    workdir: The sweep's workdir; claims go to `<workdir>/.claims`.
    csv_path: The results table; its header is written here, before any worker
      can append a row.
    worker_args: The command-line flags of this sweep, passed to each worker.
    workers: The number of processes, >= 1.
    devices: None, or one CUDA_VISIBLE_DEVICES value per worker.

  Raises:
    ValueError: for `workers` < 1 or a `devices` list of another length.
    RuntimeError: naming the workers that exited with an error.
  """
  if workers < 1:
    raise ValueError(f"workers must be >= 1, got {workers}.")
  if devices is not None and len(devices) != workers:
    raise ValueError(
        f"worker_devices must give one device per worker: {workers} workers, "
        f"got {list(devices)}."
    )
  columns = [*grid, *METRICS, WALL_SECONDS]
  _finished_runs(csv_path, columns, list(grid))  # Refuses another sweep's table.
  if not os.path.exists(csv_path) or not os.path.getsize(csv_path):
    _append_row(csv_path, columns, None)
  # Claims of a sweep that was killed would keep its unfinished runs from ever
  # being trained; the runs themselves resume from their checkpoints.
  shutil.rmtree(os.path.join(workdir, ".claims"), ignore_errors=True)
  processes = []
  for index in range(workers):
    env = dict(os.environ)
    if devices is not None:
      env["CUDA_VISIBLE_DEVICES"] = devices[index]
    command = [sys.executable, os.path.abspath(__file__), *worker_args,
               f"--worker_index={index}"]
    processes.append(subprocess.Popen(command, env=env))
  failed = [index for index, p in enumerate(processes) if p.wait() != 0]
  if failed:
    raise RuntimeError(f"sweep workers {failed} failed; their output is above.")
  print(f"{workers} workers done; results in {csv_path}", flush=True)


def _evaluate_lengths(config, run_dir, point, seq_lens, batch_size, eval_path, columns):
  """Scores the trained run at `seq_lens`; appends one row per length to `eval_path`."""
  run = evaluation.restore_run(run_dir)
  rows = evaluation.evaluate_lengths(
      run, config.data, seq_lens, batch_size=batch_size or config.train.batch_size)
  for row in rows:
    _append_row(eval_path, columns, [*_row_key(point), row["step"], row["data.seq_len"],
                                     *(row[m] for m in METRICS)])


def _claim(workdir: str, name: str) -> bool:
  """Claims run `name` for this process; False if another process has it."""
  claims = os.path.join(workdir, ".claims")
  os.makedirs(claims, exist_ok=True)
  try:
    os.close(os.open(os.path.join(claims, name), os.O_CREAT | os.O_EXCL))
  except FileExistsError:
    return False
  return True


def _row_key(point: dict[str, Any]) -> tuple[str, ...]:
  """The grid values of a run as the CSV holds them, to recognise its row."""
  return tuple(str(value) for value in point.values())


def _finished_runs(
    csv_path: str, columns: list[str], fields: list[str]
) -> set[tuple[str, ...]]:
  """The grid values of the rows already in the CSV; empty if there is none."""
  if not os.path.exists(csv_path) or not os.path.getsize(csv_path):
    return set()
  with open(csv_path, newline="") as f:
    reader = csv.DictReader(f)
    if reader.fieldnames != columns:
      raise ValueError(
          f"csv {csv_path} has columns {reader.fieldnames}, but this sweep "
          f"writes {columns}; give another --csv."
      )
    return {tuple(row[field] for field in fields) for row in reader}


def _append_row(csv_path: str, columns: list[str], row: list[Any] | None) -> None:
  """Appends one row (None: none), writing the header first into a new file."""
  # Written and closed per run: a killed sweep keeps every finished row. The
  # lock keeps rows of concurrent workers whole.
  os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
  with open(csv_path, "a", newline="") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    f.seek(0, os.SEEK_END)
    writer = csv.writer(f)
    if not f.tell():
      writer.writerow(columns)
    if row is not None:
      writer.writerow(row)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # As in train.py: orbax's INFO logs would bury the progress lines.
    logging.set_verbosity(logging.WARNING)
  grid = parse_grid(_GRID.value, _CONFIG.value)
  csv_path = _CSV.value or os.path.join(_WORKDIR.value, "results.csv")
  eval_seq_lens = None
  if _EVAL_SEQ_LENS.value:
    try:
      eval_seq_lens = [int(text) for text in _EVAL_SEQ_LENS.value]
    except ValueError:
      raise ValueError(
          f"--eval_seq_lens takes integers, got {_EVAL_SEQ_LENS.value}.") from None
  if _WORKERS.value > 1 and _WORKER_INDEX.value < 0:
    run_workers(grid, _WORKDIR.value, csv_path, sys.argv[1:],
                _WORKERS.value, _WORKER_DEVICES.value)
  else:
    sweep(_CONFIG.value, grid, _WORKDIR.value, csv_path,
          shared=_WORKER_INDEX.value >= 0, eval_seq_lens=eval_seq_lens,
          eval_batch_size=_EVAL_BATCH_SIZE.value)


if __name__ == "__main__":
  app.run(main)
