"""Logical axis names for the parameters of the memjax modules.

Every parameter is created through `flax.linen.with_logical_partitioning`, so `init` returns
it boxed in a `flax.linen.LogicallyPartitioned` that names its axes with the logical names
of `memjax.sharding.DEFAULT_RULES`. The choices follow one scheme:

* "embed": the model width D (FSDP splits weights along it).
* "heads": a dimension made of whole heads, `H` or `H * K` with the head index outermost
  (tensor parallelism splits it, so each device holds whole heads).
* "mlp": the hidden units of a feed-forward layer.
* "memory_slots": the rows of a product-key value table.
* None: a dimension never split, e.g. the dims inside one head, or sizes unrelated to the
  mesh (vocabulary, kernel width, router outputs).

A dimension a mesh splits must be divisible by its devices: `memjax.train.sharded` checks
that and names the parameter when it is not.

Modules read their parameters unboxed; `flax.linen.unbox(variables)` strips the boxes from
what `init` returns when plain arrays are wanted (e.g. to index
`variables["params"]["q_proj"]["kernel"].shape`).
"""

import math
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

Names = Sequence[Optional[str]]
# Flax's initialiser of Dense kernels (LeCun normal over the input dim).
DEFAULT_KERNEL_INIT = nn.linear.default_kernel_init


def partitioned(init: Callable, names: Names) -> Callable:
  """`init` whose result is boxed with one logical axis name per dimension."""
  return nn.with_logical_partitioning(init, tuple(names))


def dense(features: int, names: Names, *, use_bias: bool = False,
          kernel_init: Callable = DEFAULT_KERNEL_INIT,
          bias_init: Callable = nn.initializers.zeros_init(),
          name: Optional[str] = None) -> nn.Dense:
  """An `nn.Dense` [..., D_in] -> [..., features] whose kernel and bias carry axis names.

  Args:
    features: output width.
    names: the logical names of the kernel [D_in, features]; the bias [features] takes
      the second.
    use_bias: add a bias.
    kernel_init, bias_init: the initialisers (Flax's defaults when not given).
    name: the module's name.

  Returns:
    The (unbound) Dense module.

  Raises:
    ValueError: if `names` does not give two names.
  """
  names = tuple(names)
  if len(names) != 2:
    raise ValueError(f"names must give the 2 logical axes of the kernel [D_in, features], "
                     f"got {names}")
  return nn.Dense(features, use_bias=use_bias, kernel_init=partitioned(kernel_init, names),
                  bias_init=partitioned(bias_init, names[1:]), name=name)


def layer_norm(names: Names, **kwargs) -> nn.LayerNorm:
  """An `nn.LayerNorm` over the last axis whose scale and bias carry the axis `names`.

  Args:
    names: one logical name, that of the normalised axis.
    **kwargs: `nn.LayerNorm`'s other arguments (epsilon, use_scale, use_bias, name, ...).
  """
  return nn.LayerNorm(scale_init=partitioned(nn.initializers.ones, names),
                      bias_init=partitioned(nn.initializers.zeros, names), **kwargs)


def _flat_kernel_init(key, shape, dtype=jnp.float32):
  """Flax's Dense kernel init of the flat [D, prod(shape[1:])] kernel, reshaped to `shape`.

  So a kernel [D, S, H, K] starts from the values of a Dense [D, S * H * K] kernel.
  """
  return DEFAULT_KERNEL_INIT(key, (shape[0], math.prod(shape[1:])), dtype).reshape(shape)


def split_dense(in_features: int, features: Sequence[int], names: Names, *,
                name: Optional[str] = None) -> nn.Einsum:
  """A bias-free projection [..., D] -> [..., *features] with a kernel [D, *features].

  The Dense of a fused projection (e.g. q, k and v of all heads, [D, 3 * H * K]) with its
  output dims kept apart, so that each can have its own logical name: the heads of
  [D, 3, H, K] can be split over the mesh while q, k and v stay together. Initialised
  exactly as the flat Dense.

  Args:
    in_features: D, the last dim of the inputs.
    features: the output dims, e.g. (3, H, K).
    names: the logical names of the kernel, 1 + len(features) of them.
    name: the module's name.

  Returns:
    The (unbound) `nn.Einsum` module.

  Raises:
    ValueError: if `names` does not give one name per kernel dim.
  """
  features, names = tuple(features), tuple(names)
  if len(names) != 1 + len(features):
    raise ValueError(f"names must give the {1 + len(features)} logical axes of the kernel "
                     f"[D, *features] = {(in_features, *features)}, got {names}")
  out = "abcefghijklmnopqrstuvwxy"[:len(features)]
  return nn.Einsum((in_features, *features), f"...z,z{out}->...{out}", use_bias=False,
                   kernel_init=partitioned(_flat_kernel_init, names), name=name)
