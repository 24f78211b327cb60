"""The train state: everything a checkpoint must hold to resume exactly."""

from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from memjax.sharding import DEFAULT_RULES
from memjax.sharding import Rules
from memjax.train import sharded


@flax.struct.dataclass
class TrainState:
  """Parameters and optimizer state after `step` optimizer updates.

  The model and the optimizer are not fields: they are code, rebuilt from the
  config, so the state is a plain pytree of arrays that orbax saves as is.

  Attributes:
    step: int32 scalar, number of updates applied so far.
    params: The model's parameter pytree, plain arrays (no partitioning boxes).
    opt_state: The optimizer's state for `params`.
  """

  step: jax.Array
  params: Any
  opt_state: optax.OptState


def train_state_shardings(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    example_batch: dict[str, Any],
    mesh: jax.sharding.Mesh,
    rules: Rules = DEFAULT_RULES,
) -> TrainState:
  """Where each leaf of the train state lives on `mesh`.

  Parameters are laid out by their logical axis names under `rules`, the
  optimizer's per-parameter leaves as their parameters, the rest replicated
  (see `memjax.train.sharded`). Nothing is computed: the shapes come from
  `jax.eval_shape`.

  Args:
    model: A Linen module called as `model.init(rng, tokens)`.
    optimizer: The optax transformation of the state.
    example_batch: A batch with "inputs": int32 [B, T]; only its shape and
      dtype matter.
    mesh: The device mesh.
    rules: The logical axis rules.

  Returns:
    A TrainState whose leaves are `jax.sharding.NamedSharding`s.

  Raises:
    ValueError: If a parameter dimension is not divisible by the devices of
      the mesh axes that split it (the message names the parameter).
  """
  boxed = sharded.abstract_params(model, example_batch)
  params = sharded.param_shardings(boxed, mesh, rules)
  return TrainState(
      step=sharded.replicated(mesh),
      params=params,
      opt_state=sharded.opt_state_shardings(
          optimizer, nn.unbox(boxed), params, mesh
      ),
  )


def create_train_state(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    rng: jax.Array,
    example_batch: dict[str, Any],
    *,
    mesh: Optional[jax.sharding.Mesh] = None,
    rules: Rules = DEFAULT_RULES,
) -> TrainState:
  """Initialises parameters and optimizer state at step 0.

  With a mesh, every leaf is created where `train_state_shardings` puts it
  (one jitted computation with those output shardings: no device ever holds
  the whole state). Without one, everything lives on the default device. The
  values are the same either way.

  Args:
    model: A Linen module called as `model.apply({"params": p}, tokens)`.
    optimizer: The optax transformation the state will be updated with.
    rng: PRNG key for the parameter initialisers.
    example_batch: A batch with "inputs": int32 [B, T]; only its shape and
      dtype matter (B must divide over the mesh's batch axes).
    mesh: The device mesh, or None.
    rules: The logical axis rules that lay out the parameters on `mesh`.

  Returns:
    The TrainState at step 0, with plain (unboxed) parameter arrays.
  """
  inputs = jnp.asarray(example_batch["inputs"])

  def init(rng, inputs):
    with sharded.mesh_context(mesh, rules):
      # The partitioning boxes have served (their names gave the shardings):
      # the state holds plain arrays.
      params = nn.unbox(model.init(rng, inputs)["params"])
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
    )

  placement = {}
  if mesh is not None:
    placement = dict(
        in_shardings=(
            sharded.replicated(mesh),
            sharded.batch_shardings({"inputs": inputs}, mesh, rules)["inputs"],
        ),
        out_shardings=train_state_shardings(
            model, optimizer, example_batch, mesh, rules
        ),
    )
  # Jitted so that initialisers of scanned or looped layers run compiled
  # rather than op by op.
  return jax.jit(init, **placement)(rng, inputs)
