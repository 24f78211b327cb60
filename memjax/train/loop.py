"""The training loop: data, model, state, steps, evaluation, checkpoints, metrics."""

import dataclasses
import functools
import os
import time
from typing import Any, Callable, Iterable, Mapping

import jax
from jax.experimental import multihost_utils
import numpy as np

from memjax import data
from memjax import sharding
from memjax.models import DecoderLM
from memjax.train import distributed
from memjax.train import optim
from memjax.train import sharded
from memjax.train import steps
from memjax.train.checkpoint import Checkpointer
from memjax.train.metrics import MetricWriter
from memjax.train.state import create_train_state

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
# A config without `mesh`: every device data-parallel.
DEFAULT_MESH = {"data": -1}


def train_and_evaluate(config: Any, workdir: str) -> dict[str, float]:
  """Trains a DecoderLM on a task and evaluates it on the held-out split.

  The task is `config.data.task`: "mqar" (the default), "sniah" or "lm".
  Resumes from the newest checkpoint in `<workdir>/checkpoints` if there is one.
  Batch `i` is `train_ds[i]` and nothing else draws random numbers on the host,
  so a resumed run continues bit for bit as if it had not stopped.

  The state and the steps are laid out on the mesh `config.mesh` (axis sizes
  by name, see `memjax.sharding.make_mesh`; default {"data": -1}, every device
  data-parallel) by the rules `config.sharding_rules` (pairs overriding
  `memjax.sharding.DEFAULT_RULES`; default none).

  On several processes (after `memjax.train.distributed.initialize`), every
  process calls this with the same config and workdir: each reads only the
  rows of every batch its devices hold, all take part in checkpointing, and
  process 0 alone writes config.json and the metrics and prints progress.

  Args:
    config: A ConfigDict with sections `model` (DecoderLM's fields), `data`
      and `train`, and optionally `mesh` and `sharding_rules`. `data` holds,
      for "mqar", MqarTask's fields, `num_train`, `num_test`, `data_seed`,
      `source` and `data_dir` (see experiments/configs/mqar.py); for "sniah",
      `needle`, `seq_len` (the context length), `depth` and the same five
      (experiments/configs/sniah.py); for "lm", `dataset`, `train_split`,
      `eval_split`, `feature`, `seq_len` and `data_dir`
      (experiments/configs/lm.py).
    workdir: Directory for config.json, metrics.jsonl, TensorBoard event files,
      checkpoints and (for `source="tfds"` without `data_dir`) the dataset.

  Returns:
    The final metrics: "eval/loss", "eval/accuracy" (held-out accuracy: correct
    predictions / labelled positions, e.g. queries of MQAR, answer tokens of
    S-NIAH, all next tokens of LM), "eval/exact_match" (examples with every
    labelled position right / examples) and, if any step ran in this call,
    the last logged "train/..." values.

  Raises:
    ValueError: For a bad config, e.g. a train.batch_size the mesh's batch
      axes do not divide.
  """
  tc = config.train
  mesh = sharding.make_mesh(dict(config.get("mesh", None) or DEFAULT_MESH))
  rules = sharding.rules_from_config(config.get("sharding_rules", None) or ())
  _check_batch_size(tc.batch_size, mesh, rules)
  vocab_size = task_vocab_size(config.data)
  if config.model.vocab_size < vocab_size:
    raise ValueError(
        f"model.vocab_size={config.model.vocab_size} cannot embed the task's "
        f"tokens: data.task={_task(config.data)!r} uses {vocab_size} token ids."
    )
  primary = jax.process_index() == 0
  if primary:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))

  train_source, test_source = _process_sources(config.data, workdir)
  layout = dict(mesh=mesh, rules=rules)
  train_ds = _process_batches(
      functools.partial(
          data.batched_dataset, train_source, tc.batch_size, seed=tc.seed,
          shuffle=True,
      ),
      train_source[0], tc.batch_size, **layout,
  )
  model = DecoderLM(**config.model)
  optimizer = optim.make_optimizer(tc)
  schedule = optim.learning_rate_schedule(tc)
  test_ds = _process_batches(
      functools.partial(data.eval_batches, test_source, tc.batch_size),
      test_source[0], tc.batch_size, **layout,
  )
  state = create_train_state(
      model, optimizer, jax.random.key(tc.seed), train_ds[0], **layout
  )
  checkpointer = Checkpointer(
      os.path.join(workdir, CHECKPOINT_DIR),
      save_every=tc.checkpoint_every,
      keep=tc.keep_checkpoints,
  )
  state = checkpointer.restore(state)
  dtype = steps.compute_dtype(tc.get("compute_dtype", None))
  train_step = steps.make_train_step(
      model, optimizer, example_batch=train_ds[0], dtype=dtype, **layout
  )
  run_eval = functools.partial(
      evaluate,
      steps.make_eval_step(model, example_batch=test_ds[0], dtype=dtype, **layout),
      batches=test_ds,
  )
  # The other processes hold the same replicated metrics and stay quiet.
  writer = MetricWriter(workdir) if primary else None

  start = int(state.step)
  final: dict[str, float] = {}
  if start and primary:
    print(f"resumed from step {start} in {workdir}", flush=True)
  window: list[Mapping[str, jax.Array]] = []
  window_start = time.perf_counter()
  run_start = window_start
  for step in range(start, tc.num_steps):
    batch = train_ds[step]
    state, metrics = train_step(state, batch)
    window.append(metrics)
    done = step + 1
    if done % tc.log_every == 0 or done == tc.num_steps:
      # Summing the window waits for its last step, so the clock is honest.
      train = _train_summary(window, float(schedule(step)))
      now = time.perf_counter()
      tokens_per_s = len(window) * batch["inputs"].size / (now - window_start)
      _log(
          writer,
          done,
          {**train, "train/tokens_per_s": tokens_per_s},
          f"step {done}/{tc.num_steps} {progress_bar(done, tc.num_steps)}  "
          f"loss {train['train/loss']:.4f}  accuracy {train['train/accuracy']:.4f}  "
          f"{tokens_per_s:,.0f} tokens/s  {now - run_start:.1f} s, "
          f"{_remaining(now - run_start, done - start, tc.num_steps - done)} to go",
      )
      final.update(train)
      window, window_start = [], time.perf_counter()
    if done % tc.eval_every == 0 and done != tc.num_steps:
      eval_start = time.perf_counter()
      _report_eval(writer, done, run_eval(state.params))
      # Evaluation time is not training time: keep it out of tokens/s.
      window_start += time.perf_counter() - eval_start
    checkpointer.save(state, step=done)

  checkpointer.save(state, step=tc.num_steps, force=True)
  final.update(_report_eval(writer, tc.num_steps, run_eval(state.params)))
  checkpointer.close()
  if writer is not None:
    writer.close()
    print(f"final held-out accuracy: {final['eval/accuracy']:.4f}", flush=True)
  return final


def evaluate(
    eval_step: Callable[[Any, Mapping[str, Any]], Mapping[str, jax.Array]],
    params: Any,
    *,
    batches: Iterable[Mapping[str, np.ndarray]],
) -> dict[str, float]:
  """Evaluates `params` on every example of a split, aggregating exactly.

  Args:
    eval_step: `eval_step(params, batch)` returning summed token metrics.
    params: The model parameters.
    batches: One in-order pass over the split (re-iterable, e.g.
      `memjax.data.eval_batches`): dicts with "inputs" and "labels", int32
      [B, T]; padding rows must be labelled IGNORE_INDEX only.

  Returns:
    "loss" and "accuracy" over all labelled positions of the split, and
    "exact_match" over its examples when `eval_step` counts them (as
    `steps.make_eval_step` does).
  """
  # Dispatch every batch before reading any result back, so the device does
  # not wait on the host between batches.
  sums = [eval_step(params, batch) for batch in batches]
  return steps.summarize(functools.reduce(steps.add_metrics, sums, {}))


def _check_batch_size(
    batch_size: int, mesh: jax.sharding.Mesh, rules: sharding.Rules
) -> None:
  """Raises a ValueError unless the batch splits evenly over its mesh axes."""
  axes, devices = sharded.split_devices("batch", mesh, rules)
  if batch_size % devices:
    raise ValueError(
        f"train.batch_size={batch_size} (the rows of every train and eval "
        f"batch) must be divisible by the {devices} devices of the mesh axes "
        f"{axes} that split the batch, in the mesh {dict(mesh.shape)} "
        f"(config.mesh), over {jax.process_count()} process(es)."
    )


def _process_batches(
    make: Callable[..., Any],
    example: Mapping[str, np.ndarray],
    batch_size: int,
    *,
    mesh: jax.sharding.Mesh,
    rules: sharding.Rules,
) -> Any:
  """A pipeline of global batches, of which this process reads only its rows.

  Args:
    make: `make(process_index=, process_count=)` returns the pipeline of this
      process's rows, e.g. `data.batched_dataset` with its other arguments.
    example: One example of the source, {name: [...]}: gives the shapes.
    batch_size: B, the rows of a global batch.
    mesh: The device mesh.
    rules: The logical axis rules that lay the batch out on it.

  Returns:
    A MapDataset of global batches {name: [B, ...]}: the pipeline's numpy
    arrays with one process, `jax.Array`s laid out on the mesh with several.
  """
  shapes = {
      name: jax.ShapeDtypeStruct((batch_size,) + np.shape(array), np.asarray(array).dtype)
      for name, array in example.items()
  }
  shardings = sharded.batch_shardings(shapes, mesh, rules)
  index, count = distributed.batch_share(shardings["inputs"], shapes["inputs"].shape)
  return make(process_index=index, process_count=count).map(
      functools.partial(
          distributed.global_batch, shardings=shardings, global_rows=batch_size
      )
  )


def progress_bar(done: int, total: int, width: int = 20) -> str:
  """A text bar of `width` cells, `done / total` of them filled: "[#####---------------]"."""
  filled = min(width, width * done // max(total, 1))
  return "[" + "#" * filled + "-" * (width - filled) + "]"


def _remaining(elapsed: float, steps_done: int, steps_left: int) -> str:
  """The time the steps left will take at this call's pace so far, e.g. "3 min 20 s"."""
  seconds = round(elapsed / max(steps_done, 1) * steps_left)
  return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


def _train_summary(window, learning_rate: float) -> dict[str, float]:
  """Means over the steps of a logging window, from their summed metrics."""
  sums = functools.reduce(steps.add_metrics, window, {})
  means = steps.summarize(sums)
  return {
      "train/loss": means["loss"],
      "train/accuracy": means["accuracy"],
      "train/grad_norm": float(sums["grad_norm"]) / len(window),
      "train/learning_rate": learning_rate,
  }


def _report_eval(writer: MetricWriter | None, step: int, means) -> dict[str, float]:
  """Prints and writes held-out metrics; returns them with "eval/" names."""
  scalars = {f"eval/{name}": value for name, value in means.items()}
  _log(
      writer,
      step,
      scalars,
      f"step {step}  held-out loss {scalars['eval/loss']:.4f}  "
      f"accuracy {scalars['eval/accuracy']:.4f}  "
      f"exact match {scalars['eval/exact_match']:.4f}",
  )
  return scalars


def _log(writer: MetricWriter | None, step: int, scalars, line: str) -> None:
  """Prints `line` and writes `scalars`; on processes without a writer, nothing."""
  if writer is None:
    return
  print(line, flush=True)
  writer.write(step, scalars)


def _task(data_config: Any) -> str:
  """The task named by the `data` section of the config; "mqar" if none is."""
  task = data_config.get("task", "mqar")
  if task not in _SOURCES:
    raise ValueError(f"data.task must be one of {tuple(_SOURCES)}, got {task!r}.")
  return task


def task_vocab_size(data_config: Any) -> int:
  """The number of token ids of the task's data, which the model must embed."""
  if _task(data_config) == "mqar":
    return data_config.vocab_size
  return data.tokenizer.VOCAB_SIZE


def _process_sources(data_config: Any, workdir: str):
  """`task_sources`, built by process 0 before the other processes read them.

  A synthetic TFDS task is generated on first use; processes sharing a
  workdir must not all write it at once.
  """
  if jax.process_count() == 1:
    return task_sources(data_config, workdir)
  if jax.process_index() == 0:
    sources = task_sources(data_config, workdir)
  multihost_utils.sync_global_devices("memjax: the data sources are built")
  if jax.process_index() != 0:
    sources = task_sources(data_config, workdir)
  return sources


def task_sources(data_config: Any, workdir: str):
  """Builds the train and test random-access sources named by the config.

  Args:
    data_config: The `data` section of the config.
    workdir: The run's directory; `<workdir>/tfds` is the default data_dir of
      the synthetic tasks.

  Returns:
    (train source, test source).
  """
  return _SOURCES[_task(data_config)](data_config, workdir)


def _mqar_sources(data_config: Any, workdir: str):
  """The sources of MQAR; see `task_sources`."""
  task = data.MqarTask(
      **{f.name: data_config[f.name] for f in dataclasses.fields(data.MqarTask)}
  )
  return _synthetic_sources(
      data_config, workdir, task, data.generate_mqar, data.load_mqar
  )


def _sniah_sources(data_config: Any, workdir: str):
  """The sources of S-NIAH; see `task_sources`."""
  task = data.SniahTask(
      needle=data_config.needle,
      context_length=data_config.seq_len,
      depth=data_config.depth,
  )
  return _synthetic_sources(
      data_config, workdir, task, data.generate_sniah, data.load_sniah
  )


def _synthetic_sources(
    data_config: Any,
    workdir: str,
    task: Any,
    generate: Callable[..., dict[str, np.ndarray]],
    load: Callable[..., Any],
):
  """The sources of a synthetic task, generated in memory or built with TFDS.

  Args:
    data_config: The `data` section of the config.
    workdir: The run's directory; see `task_sources`.
    task: The task, e.g. an MqarTask.
    generate: Its generator, `generate(task, num_examples, seed)`, e.g.
      `data.generate_mqar`.
    load: Its TFDS loader, e.g. `data.load_mqar`.

  Returns:
    (train source, test source).
  """
  if data_config.source == "numpy":
    # Seeded per split as the TFDS builder is, so both sources hold the same
    # examples.
    return tuple(
        data.ArraySource(
            generate(task, n, data.split_seed(data_config.data_seed, split))
        )
        for split, n in (
            ("train", data_config.num_train),
            ("test", data_config.num_test),
        )
    )
  if data_config.source == "tfds":
    load = functools.partial(
        load,
        task,
        data_dir=data_config.data_dir or os.path.join(workdir, "tfds"),
        num_train=data_config.num_train,
        num_test=data_config.num_test,
        seed=data_config.data_seed,
    )
    return load("train"), load("test")
  raise ValueError(
      f'data.source must be "tfds" or "numpy", got {data_config.source!r}.'
  )


def _lm_sources(data_config: Any, workdir: str):
  """The packed windows of a TFDS text dataset; see `task_sources`."""
  # A corpus lives in its TFDS data_dir (None: the TFDS default), shared by
  # runs, rather than in the run's directory.
  del workdir
  load = functools.partial(
      data.load_text,
      data_config.dataset,
      seq_len=data_config.seq_len,
      data_dir=data_config.data_dir,
      feature=data_config.feature,
  )
  return load(data_config.train_split), load(data_config.eval_split)


_SOURCES = {"mqar": _mqar_sources, "sniah": _sniah_sources, "lm": _lm_sources}
