"""The optimizer: AdamW with linear warmup, cosine decay and gradient clipping."""

from typing import Any

import jax
import optax

from memjax.models.summary import SCANNED_RUN

# Parameters with these names are offsets or gains: decaying them towards zero
# does not regularise the function the model computes.
_NO_DECAY_NAMES = ("bias", "scale")


def learning_rate_schedule(config: Any) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then cosine decay to 0.

  The decay horizon is `config.decay_steps`, or `config.num_steps` when that is
  None. Keeping it fixed while `num_steps` changes is what lets a shortened run
  reproduce the first steps of a longer one exactly.

  Args:
    config: The `train` section of the config: `learning_rate`,
      `warmup_steps`, `num_steps`, `decay_steps`.

  Returns:
    A function of the step count (int) giving the learning rate.

  Raises:
    ValueError: if the horizon is not longer than the warmup.
  """
  horizon = config.decay_steps or config.num_steps
  if horizon <= config.warmup_steps:
    raise ValueError(
        f"the decay horizon (train.decay_steps, else train.num_steps) must "
        f"exceed train.warmup_steps={config.warmup_steps}, got {horizon}."
    )
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=config.learning_rate,
      warmup_steps=config.warmup_steps,
      decay_steps=horizon,
      end_value=0.0,
  )


def weight_decay_mask(params: Any) -> Any:
  """Marks the parameters that weight decay applies to.

  Biases, norm scales and every other parameter with fewer than two dimensions
  are left out; matrices (embeddings included) and higher-rank kernels decay. In a
  scanned run of decoder layers (`layers_<first>_<last>`) every parameter has a
  leading layer axis, which does not count.

  Args:
    params: A pytree of parameter arrays, as nested dicts (Flax layout),
      plain or in Flax's partitioning boxes.

  Returns:
    A pytree of bools of the same structure: True where decay applies.
  """

  def decays(path, param):
    # Dict keys only: a parameter still in Flax's partitioning box has one more
    # path entry (the box's `value`), which is not part of its name.
    keys = [str(entry.key) for entry in path
            if isinstance(entry, jax.tree_util.DictKey)]
    layer_axes = sum(1 for key in keys if SCANNED_RUN.match(key))
    return param.ndim - layer_axes >= 2 and keys[-1] not in _NO_DECAY_NAMES

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: Any) -> optax.GradientTransformation:
  """Global-norm clipping followed by AdamW on the warmup-cosine schedule.

  Args:
    config: The `train` section of the config: the schedule's fields plus
      `weight_decay` (decoupled, scaled by the learning rate as in AdamW) and
      `grad_clip` (maximum global gradient norm, > 0).

  Returns:
    The optax transformation.

  Raises:
    ValueError: if `grad_clip` is not positive.
  """
  if not config.grad_clip > 0:
    raise ValueError(f"train.grad_clip must be > 0, got {config.grad_clip}.")
  return optax.chain(
      optax.clip_by_global_norm(config.grad_clip),
      optax.adamw(
          learning_rate_schedule(config),
          weight_decay=config.weight_decay,
          mask=weight_decay_mask,
      ),
  )
