"""The jitted train and eval steps and the masked token metrics they share.

Both steps return sums and counts rather than means, so that metrics over many
batches (a logging window, the whole test split) aggregate exactly: the mean is
taken once, at the end, by `summarize`. The eval step also counts examples
answered exactly, for tasks scored per example (S-NIAH).

Given a mesh, a step is jitted with explicit shardings: the state (or params)
as `memjax.train.state.train_state_shardings` lays it out, the batch split over
("batch", "seq") (`memjax.train.sharded.batch_shardings`), the metrics
replicated; the model runs under the mesh and the logical axis rules, so the
activation constraints of its blocks apply. Without a mesh the same step is
jitted without shardings.

    mesh = memjax.sharding.make_mesh({"data": 2, "fsdp": 2, "model": 2})
    state = create_train_state(model, tx, key, batch, mesh=mesh, rules=rules)
    step = make_train_step(model, tx, mesh=mesh, rules=rules,
                           example_batch=batch)
    state, metrics = step(state, batch)
"""

from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from memjax.data import IGNORE_INDEX
from memjax.sharding import DEFAULT_RULES
from memjax.sharding import Rules
from memjax.train import sharded
from memjax.train.state import TrainState
from memjax.train.state import train_state_shardings

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


COMPUTE_DTYPES = ("float32", "bfloat16")


def compute_dtype(name: Optional[str]) -> Optional[jnp.dtype]:
  """The dtype of a `train.compute_dtype` config value; None for "float32" or None.

  Raises:
    ValueError: for a name not in `COMPUTE_DTYPES`.
  """
  if name is None or name == "float32":
    return None
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {name!r}")
  return jnp.dtype(name)


def cast_params(params: Any, dtype: Optional[jnp.dtype]) -> Any:
  """The compute copy of the float32 parameters: floating leaves in `dtype` (None: as
  they are). Under `jax.grad` the cast passes the gradients back in float32."""
  if dtype is None:
    return params
  return jax.tree.map(
      lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)


def _check_example(mesh, example_batch, caller: str) -> None:
  if mesh is not None and example_batch is None:
    raise ValueError(
        f"{caller} with a mesh needs example_batch (a batch of the shapes the "
        "step will get) to lay out the state and the batches; got None"
    )


def make_train_step(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    *,
    mesh: Optional[jax.sharding.Mesh] = None,
    rules: Rules = DEFAULT_RULES,
    example_batch: Optional[Mapping[str, Any]] = None,
    dtype: Optional[jnp.dtype] = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """Builds `train_step(state, batch) -> (state, metrics)`, jitted.

  The loss is the mean cross-entropy over the batch's labelled positions. The
  input state is donated: its buffers are reused for the new state, so the
  caller must not touch it after the call.

  Args:
    model: The Linen module; `model.apply({"params": p}, inputs)` gives
      float32 logits [B, T, V].
    optimizer: The optax transformation whose state is `state.opt_state`.
    mesh: The device mesh, or None (no shardings: the default device).
    rules: The logical axis rules of parameters and activations on `mesh`.
    example_batch: With a mesh, a batch of the shapes the step will get
      (e.g. the first one); it fixes the shardings.
    dtype: None, or the dtype the model computes in (bfloat16: mixed precision).
      The params, the optimizer state and the gradients stay float32; each step
      runs the model on a copy of the params in `dtype` (`cast_params`), so its
      activations, and the inputs of the memory ops, are in `dtype`. The loss
      is taken in float32.

  Returns:
    The jitted step. `batch` holds "inputs" and "labels", int32 [B, T];
    `metrics` holds the sums of `token_metrics` plus "grad_norm", the global
    norm of the gradient before clipping. With a mesh, the state must be laid
    out as `train_state_shardings` says (as `create_train_state` makes it)
    and the new state is too; the metrics are replicated.

  Raises:
    ValueError: With a mesh: if `example_batch` is None, or a parameter or
      batch dimension is not divisible by the devices that split it.
  """
  _check_example(mesh, example_batch, "make_train_step")

  def train_step(state: TrainState, batch: Batch):
    def loss_fn(params):
      with sharded.mesh_context(mesh, rules):
        logits = model.apply({"params": cast_params(params, dtype)}, batch["inputs"])
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

  placement = {}
  if mesh is not None:
    state_shardings = train_state_shardings(
        model, optimizer, example_batch, mesh, rules
    )
    placement = dict(
        in_shardings=(
            state_shardings,
            sharded.batch_shardings(example_batch, mesh, rules),
        ),
        out_shardings=(state_shardings, sharded.replicated(mesh)),
    )
  return jax.jit(train_step, donate_argnums=0, **placement)


def make_eval_step(
    model: nn.Module,
    *,
    mesh: Optional[jax.sharding.Mesh] = None,
    rules: Rules = DEFAULT_RULES,
    example_batch: Optional[Mapping[str, Any]] = None,
    dtype: Optional[jnp.dtype] = None,
) -> Callable[[Any, Batch], Metrics]:
  """Builds `eval_step(params, batch) -> metrics`, jitted.

  Args:
    model: The Linen module, as for `make_train_step`.
    mesh: The device mesh, or None, as for `make_train_step`.
    rules: The logical axis rules, as for `make_train_step`.
    example_batch: With a mesh, a batch of the shapes the step will get.
    dtype: None, or the dtype the model computes in, as for `make_train_step`.

  Returns:
    The jitted step; `metrics` are the sums of `token_metrics` and the counts
    of `example_metrics` for the batch. With a mesh, `params` must be laid out
    as `train_state_shardings(...).params` says; the metrics are replicated.

  Raises:
    ValueError: As `make_train_step`.
  """
  _check_example(mesh, example_batch, "make_eval_step")

  def eval_step(params, batch: Batch) -> Metrics:
    with sharded.mesh_context(mesh, rules):
      logits = model.apply({"params": cast_params(params, dtype)}, batch["inputs"])
    return {
        **token_metrics(logits, batch["labels"]),
        **example_metrics(logits, batch["labels"]),
    }

  placement = {}
  if mesh is not None:
    params = sharded.param_shardings(
        sharded.abstract_params(model, example_batch), mesh, rules
    )
    placement = dict(
        in_shardings=(
            params,
            sharded.batch_shardings(example_batch, mesh, rules),
        ),
        out_shardings=sharded.replicated(mesh),
    )
  return jax.jit(eval_step, **placement)
