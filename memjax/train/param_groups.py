"""Parameter groups with their own learning rate: the value tables of product-key memories.

Memory Layers at Scale (arXiv 2412.09764) trains the memory values with a learning rate of
their own: each value row is updated only by the tokens that select it, so it sees far
fewer updates than a dense weight.
"""

from typing import Any, Callable, Union

import jax
import optax

from memjax.nn.product_keys import VALUES_PARAM

VALUES_GROUP = "values"
DEFAULT_GROUP = "default"


def value_table_labels(params: Any) -> Any:
  """Labels every parameter `VALUES_GROUP` (a product-key value table) or `DEFAULT_GROUP`.

  A leaf is a value table when some key on its path is `VALUES_PARAM`, so tables shared
  between layers and tables still wrapped in Flax's `LogicallyPartitioned` boxes are found
  alike.

  Args:
    params: a parameter pytree (Flax layout: nested dicts).

  Returns:
    A pytree of the same structure with a group name at every leaf.
  """

  def label(path, _):
    is_values = any(getattr(entry, "key", None) == VALUES_PARAM for entry in path)
    return VALUES_GROUP if is_values else DEFAULT_GROUP

  return jax.tree_util.tree_map_with_path(label, params)


def value_learning_rate_transform(
    make_optimizer: Callable[[Union[float, optax.Schedule]], optax.GradientTransformation],
    learning_rate: Union[float, optax.Schedule],
    value_learning_rate: Union[float, optax.Schedule],
) -> optax.GradientTransformation:
  """One optimizer for the product-key value tables and another for everything else.

  Both come from `make_optimizer`, so they differ only in the learning rate. Transforms
  that must see all gradients together (e.g. `optax.clip_by_global_norm`) belong outside:
  `optax.chain(optax.clip_by_global_norm(1.0), value_learning_rate_transform(...))`.

  Args:
    make_optimizer: builds an optimizer from a learning rate (float or schedule), e.g.
      `lambda lr: optax.adamw(lr, weight_decay=0.1)`.
    learning_rate: for every parameter but the value tables.
    value_learning_rate: for the value tables (parameters named `VALUES_PARAM`).

  Returns:
    An `optax.multi_transform` over the two groups of `value_table_labels`.
  """
  return optax.multi_transform(
      {DEFAULT_GROUP: make_optimizer(learning_rate),
       VALUES_GROUP: make_optimizer(value_learning_rate)},
      value_table_labels)
