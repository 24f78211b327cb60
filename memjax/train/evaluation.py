"""Evaluation of a trained run at other context lengths (length generalisation).

The protocol of the Titans paper's S-NIAH table: a model trained on one
context length is scored on the held-out split of the same task at longer
ones. The model and its parameters come from the run's workdir; the task comes
from a `data` config section whose `seq_len` (and, for S-NIAH, `needle`) is
swept:

    run = restore_run("/tmp/memjax/sniah")
    rows = evaluate_lengths(run, run.config.data, [1024, 2048, 4096, 8192],
                            needles=["passkey", "number"], batch_size=4)
    rows[0]  # {"model.mixers": "gdn,gdn", "step": 2000, "data.seq_len": 1024,
             #  "data.needle": "passkey", "eval/loss": ..., "eval/accuracy": ...,
             #  "eval/exact_match": ...}

The held-out examples at the trained length are the run's own, so that row
repeats the final "eval/..." metrics of `train_and_evaluate` exactly.
"""

import copy
import json
import os
import time
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from memjax import data
from memjax.data.sniah import NEEDLES
from memjax.models import DecoderLM
from memjax.train import loop
from memjax.train import steps


class Run(NamedTuple):
  """A training run restored from its workdir.

  Attributes:
    workdir: The run's directory.
    config: Its config, as `train_and_evaluate` wrote it to config.json.
    model: The DecoderLM of `config.model`.
    params: The parameters of its newest checkpoint, on the default device.
    step: The training step of that checkpoint.
  """

  workdir: str
  config: ml_collections.ConfigDict
  model: DecoderLM
  params: Any
  step: int


def restore_run(workdir: str) -> Run:
  """Restores the model and parameters of the newest checkpoint of a run.

  Only the parameters are read (not the optimizer state), and the checkpoint
  directory is opened read-only, so a run that is still training may be
  evaluated alongside.

  Args:
    workdir: The `workdir` given to `train_and_evaluate`: it holds config.json
      and checkpoints/<step>/.

  Returns:
    The Run.

  Raises:
    ValueError: naming `workdir` if it has no config.json or no checkpoint.
  """
  config_path = os.path.join(workdir, loop.CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise ValueError(
        f"workdir {workdir!r} has no {loop.CONFIG_FILE}: it is not the "
        "workdir of a training run."
    )
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  directory = os.path.abspath(os.path.join(workdir, loop.CHECKPOINT_DIR))
  if not os.path.isdir(directory):
    raise ValueError(f"workdir {workdir!r} has no checkpoint directory {directory}.")
  model = DecoderLM(**config.model)
  # Shapes only: the parameters of the length the run trained on. `init` boxes
  # them with their logical axis names; the checkpoint holds plain arrays.
  tokens = jax.ShapeDtypeStruct((1, config.data.seq_len), jnp.int32)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = {
      "params": jax.tree.map(
          lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes
      )
  }
  manager = ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(
          read_only=True, create=False, save_interval_steps=0
      ),
  )
  try:
    step = manager.latest_step()
    if step is None:
      raise ValueError(
          f"workdir {workdir!r} has no checkpoint in {directory}: train it "
          "first (experiments/train.py with this --workdir)."
      )
    # The checkpoint holds the whole TrainState; partial_restore reads its
    # "params" subtree alone.
    restored = manager.restore(
        step,
        args=ocp.args.PyTreeRestore(
            target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
        ),
    )
  finally:
    manager.close()
  return Run(workdir, config, model, restored["params"], int(step))


def held_out_source(data_config: Any, workdir: str):
  """The test split of the task named by a `data` config section.

  Built as `train_and_evaluate` builds it (`memjax.train.loop`), so its
  examples are the ones a training run with this `data` section is scored on.
  Each split of a synthetic task is generated from its own seed, so its test
  examples do not depend on `num_train`: the train split is cut to one example
  rather than generated (or built with TFDS) at every length evaluated.

  Args:
    data_config: A `data` section, e.g. of experiments/configs/sniah.py.
    workdir: The run's directory; `<workdir>/tfds` is the default data_dir.

  Returns:
    A random-access source: `source[i]` is {"inputs", "labels": int32 [T]}.
  """
  data_config = copy.deepcopy(data_config)
  if "num_train" in data_config:
    # TFDS refuses to write an empty split.
    data_config.num_train = 1
  _, test = loop.task_sources(data_config, workdir)
  return test


def evaluate_lengths(
    run: Run,
    data_config: Any,
    seq_lens: Sequence[int],
    *,
    needles: Sequence[str] | None = None,
    batch_size: int,
) -> list[dict[str, Any]]:
  """Scores a run on the held-out split of its task at several lengths.

  Every source is built before the first evaluation, so a length the task
  cannot hold fails at once. Each row is printed as it is done.

  Args:
    run: The run, from `restore_run`.
    data_config: The `data` section of the task, of the run's task; its
      `seq_len` (the S-NIAH context length, the MQAR sequence length) and
      `needle` are replaced by each row's.
    seq_lens: The lengths T, distinct and >= 1.
    needles: For S-NIAH, the needles to score ("passkey", "number", "word");
      None means `data_config.needle`. Must be None for other tasks.
    batch_size: Examples per evaluation batch B; each batch is int32 [B, T].

  Returns:
    One row per (length, needle), lengths outer: {"model.mixers", "step",
    "data.seq_len", "data.needle" (S-NIAH only), "eval/loss",
    "eval/accuracy", "eval/exact_match"}, as `train_and_evaluate` names the
    metrics and experiments/sweep.py the config fields.

  Raises:
    ValueError: naming the argument, for empty or repeated `seq_lens`, a
      length < 1, an unknown needle, needles for a task without them, a task
      other than the run's, `batch_size` < 1, or a length the task cannot
      hold.
  """
  task = data_config.get("task", "mqar")
  run_task = run.config.data.get("task", "mqar")
  if task != run_task:
    raise ValueError(
        f"data_config is of task {task!r} but the run in {run.workdir!r} "
        f"trained on {run_task!r}; give the run's config."
    )
  if not seq_lens:
    raise ValueError("seq_lens must hold at least one length, got none.")
  if len(set(seq_lens)) != len(seq_lens) or min(seq_lens) < 1:
    raise ValueError(f"seq_lens must be distinct lengths >= 1, got {list(seq_lens)}.")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  if task != "sniah" and needles is not None:
    raise ValueError(f"needles apply to task 'sniah' only; this run's task is {task!r}.")
  if task == "sniah":
    needles = [data_config.needle] if needles is None else list(needles)
    unknown = [n for n in needles if n not in NEEDLES]
    if not needles or unknown or len(set(needles)) != len(needles):
      raise ValueError(
          f"needles must be distinct names from {NEEDLES}, got {needles}."
      )

  cases = []
  for seq_len in seq_lens:
    for needle in needles or [None]:
      case = copy.deepcopy(data_config)
      case.seq_len = seq_len
      labels = {"data.seq_len": seq_len}
      if needle is not None:
        case.needle = needle
        labels["data.needle"] = needle
      vocab_size = loop.task_vocab_size(case)
      if run.model.vocab_size < vocab_size:
        raise ValueError(
            f"data_config's task uses {vocab_size} token ids but the run's "
            f"model embeds {run.model.vocab_size} (its model.vocab_size)."
        )
      cases.append((labels, held_out_source(case, run.workdir)))

  # One jitted step for every case; it compiles once per length.
  eval_step = steps.make_eval_step(
      run.model, dtype=steps.compute_dtype(run.config.train.get("compute_dtype", None)))
  rows = []
  for labels, source in cases:
    start = time.perf_counter()
    means = loop.evaluate(
        eval_step, run.params, batches=data.eval_batches(source, batch_size)
    )
    row = {"model.mixers": run.config.model.mixers, "step": run.step, **labels}
    row.update({f"eval/{name}": value for name, value in means.items()})
    rows.append(row)
    print(
        "  ".join(f"{k.split('.')[-1]} {v}" for k, v in labels.items())
        + f"  loss {row['eval/loss']:.4f}  accuracy {row['eval/accuracy']:.4f}"
        f"  exact match {row['eval/exact_match']:.4f}"
        f"  ({len(source)} examples, {time.perf_counter() - start:.1f} s)",
        flush=True,
    )
  return rows
