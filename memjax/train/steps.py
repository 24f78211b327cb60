"""The jitted train and eval steps and the masked token metrics they share.

Both steps return sums and counts rather than means, so that metrics over many
batches (a logging window, the whole test split) aggregate exactly: the mean is
taken once, at the end, by `summarize`. The eval step also counts examples
answered exactly, for tasks scored per example (S-NIAH).
"""

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from memjax.data import IGNORE_INDEX
from memjax.train.state import TrainState

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


def token_metrics(logits: jax.Array, labels: jax.Array) -> Metrics:
  """Summed cross-entropy and correct argmax predictions at labelled positions.

  Args:
    logits: float [B, T, V].
    labels: int [B, T]; the target id, or IGNORE_INDEX where there is none.

  Returns:
    float32 scalar "loss_sum" (nats), int32 scalars "correct" and "count"
    (number of positions whose label is not IGNORE_INDEX).
  """
  mask = labels != IGNORE_INDEX
  # IGNORE_INDEX is not a valid class id; any valid id works at masked positions.
  targets = jnp.where(mask, labels, 0)
  nll = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets
  )
  hits = mask & (jnp.argmax(logits, axis=-1) == targets)
  return {
      "loss_sum": jnp.sum(jnp.where(mask, nll, 0.0)),
      "correct": jnp.sum(hits, dtype=jnp.int32),
      "count": jnp.sum(mask, dtype=jnp.int32),
  }


def example_metrics(logits: jax.Array, labels: jax.Array) -> Metrics:
  """Counts the examples whose every labelled position is predicted correctly.

  Rows without any label (the padding rows of `memjax.data.eval_batches`) are
  not examples and are counted in neither sum.

  Args:
    logits: float [B, T, V].
    labels: int [B, T]; the target id, or IGNORE_INDEX where there is none.

  Returns:
    int32 scalars "exact" (examples all of whose labelled positions have the
    label as argmax) and "examples" (rows with at least one label).
  """
  mask = labels != IGNORE_INDEX
  wrong = mask & (jnp.argmax(logits, axis=-1) != labels)
  labelled = jnp.any(mask, axis=1)
  return {
      "exact": jnp.sum(labelled & ~jnp.any(wrong, axis=1), dtype=jnp.int32),
      "examples": jnp.sum(labelled, dtype=jnp.int32),
  }


def summarize(sums: Mapping[str, Any]) -> dict[str, float]:
  """Turns summed metrics into means.

  Args:
    sums: "loss_sum", "correct", "count" added up over any number of batches,
      and optionally "exact" and "examples" (`example_metrics`).

  Returns:
    "loss" (mean nats per labelled position) and "accuracy" (fraction of
    labelled positions predicted correctly); NaN if nothing was labelled. With
    "examples" in `sums`, also "exact_match" (fraction of examples predicted
    correctly at every labelled position); NaN if there were none.
  """
  count = float(sums.get("count", 0))
  means = {"loss": float("nan"), "accuracy": float("nan")}
  if count:
    means = {
        "loss": float(sums["loss_sum"]) / count,
        "accuracy": float(sums["correct"]) / count,
    }
  if "examples" in sums:
    examples = float(sums["examples"])
    means["exact_match"] = float(sums["exact"]) / examples if examples else float("nan")
  return means


def add_metrics(total: Mapping[str, Any], metrics: Mapping[str, Any]) -> dict:
  """Adds two dicts of summed metrics on the host, in float64/int64.

  Args:
    total: Running sums (numpy or Python scalars), or {} to start.
    metrics: One step's sums, device arrays or numpy.

  Returns:
    The updated sums as numpy scalars.
  """
  out = dict(total)
  for name, value in jax.device_get(dict(metrics)).items():
    value = np.asarray(value)
    value = value.astype(np.float64 if value.dtype.kind == "f" else np.int64)
    out[name] = out.get(name, 0) + value
  return out


def make_train_step(
    model: nn.Module, optimizer: optax.GradientTransformation
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """Builds `train_step(state, batch) -> (state, metrics)`, jitted.

  The loss is the mean cross-entropy over the batch's labelled positions. The
  input state is donated: its buffers are reused for the new state, so the
  caller must not touch it after the call.

  Args:
    model: The Linen module; `model.apply({"params": p}, inputs)` gives
      float32 logits [B, T, V].
    optimizer: The optax transformation whose state is `state.opt_state`.

  Returns:
    The jitted step. `batch` holds "inputs" and "labels", int32 [B, T];
    `metrics` holds the sums of `token_metrics` plus "grad_norm", the global
    norm of the gradient before clipping.
  """

  def train_step(state: TrainState, batch: Batch):
    def loss_fn(params):
      logits = model.apply({"params": params}, batch["inputs"])
      sums = token_metrics(logits, batch["labels"])
      return sums["loss_sum"] / jnp.maximum(sums["count"], 1), sums

    grads, sums = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
    )
    # Written out rather than taken from optax, whose name for it changed
    # across the supported versions.
    grad_norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
    return new_state, {**sums, "grad_norm": grad_norm}

  return jax.jit(train_step, donate_argnums=0)


def make_eval_step(model: nn.Module) -> Callable[[Any, Batch], Metrics]:
  """Builds `eval_step(params, batch) -> metrics`, jitted.

  Args:
    model: The Linen module, as for `make_train_step`.

  Returns:
    The jitted step; `metrics` are the sums of `token_metrics` and the counts
    of `example_metrics` for the batch.
  """

  def eval_step(params, batch: Batch) -> Metrics:
    logits = model.apply({"params": params}, batch["inputs"])
    return {
        **token_metrics(logits, batch["labels"]),
        **example_metrics(logits, batch["labels"]),
    }

  return jax.jit(eval_step)
