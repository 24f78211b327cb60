"""The train state: everything a checkpoint must hold to resume exactly."""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Parameters and optimizer state after `step` optimizer updates.

  The model and the optimizer are not fields: they are code, rebuilt from the
  config, so the state is a plain pytree of arrays that orbax saves as is.

  Attributes:
    step: int32 scalar, number of updates applied so far.
    params: The model's parameter pytree.
    opt_state: The optimizer's state for `params`.
  """

  step: jax.Array
  params: Any
  opt_state: optax.OptState


def create_train_state(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    rng: jax.Array,
    example_batch: dict[str, Any],
) -> TrainState:
  """Initialises parameters and optimizer state at step 0.

  Args:
    model: A Linen module called as `model.apply({"params": p}, tokens)`.
    optimizer: The optax transformation the state will be updated with.
    rng: PRNG key for the parameter initialisers.
    example_batch: A batch with "inputs": int32 [B, T]; only its shape and
      dtype matter.

  Returns:
    The TrainState at step 0.
  """
  # Jitted so that initialisers of scanned or looped layers run compiled
  # rather than op by op.
  params = jax.jit(model.init)(rng, jnp.asarray(example_batch["inputs"]))[
      "params"
  ]
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=optimizer.init(params),
  )
