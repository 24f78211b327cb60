"""The memory models of the neural long-term memory and their per-token gradients.

Weights are a tuple of per-layer matrices `[..., d_in, d_out]` in the row-vector convention
`z = h W` (the layout of the matrix-memory state [B, H, K, V] of DESIGN.md). One layer is
the linear memory `M(x) = x W` (K -> V); `L >= 2` layers are the paper's residual MLP
`M(x) = x + LN(sigma(... sigma(x W_1) ...) W_L)` (K = V), with a LayerNorm without learned
scale or bias, so that the memory's parameters are exactly its weight matrices.

The gradient of one token's loss with respect to a layer is the outer product
`h^T delta` of the layer's input `h` and the loss gradient `delta` at the layer's output
(pre-activation): the rank-1 factors that the chunkwise form works with.
"""

from typing import Callable, List, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax

ACTIVATIONS = {"gelu": jax.nn.gelu, "silu": jax.nn.silu, "relu": jax.nn.relu}
_LAYER_NORM_EPS = 1e-5


def check_activation(activation: str) -> None:
  """Raises ValueError unless `activation` names one of `ACTIVATIONS`."""
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")


def _layer_norm(x: jax.Array) -> jax.Array:
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * lax.rsqrt(var + _LAYER_NORM_EPS)


def compose(apply_layer: Callable[[int, jax.Array], jax.Array], x: jax.Array, depth: int,
            activation: str) -> Tuple[jax.Array, List[jax.Array]]:
  """The memory architecture around a given way of applying each layer's weights.

  The plain forward pass applies stored weights; the chunkwise form applies each token's
  weights through the dual form. Both share this one definition of the architecture.

  Args:
    apply_layer: `(i, h) -> z`, layer i's pre-activation for inputs h [..., d_in].
    x: the memory inputs [..., K].
    depth: number of layers L.
    activation: name of sigma in `ACTIVATIONS`.

  Returns:
    `(output [..., V], inputs)` where `inputs[i]` is layer i's input.
  """
  sigma = ACTIVATIONS[activation]
  h, inputs = x, []
  for i in range(depth):
    inputs.append(h)
    z = apply_layer(i, h)
    h = sigma(z) if i < depth - 1 else z
  return (h if depth == 1 else x + _layer_norm(h)), inputs


def forward(weights: Sequence[jax.Array], x: jax.Array, activation: str, precision=None,
            shifts=None) -> Tuple[jax.Array, List[jax.Array]]:
  """Applies the memory with the given weights.

  Args:
    weights: per-layer weights, layer i [..., d_in_i, d_out_i].
    x: inputs [..., C, K] (the leading dims those of the weights).
    activation: name of sigma.
    precision: matmul precision.
    shifts: optional additions to each layer's pre-activation, [..., C, d_out_i] (zeros
      whose cotangents are the per-token output gradients, see `gradient_factors`).

  Returns:
    `(output [..., C, V], inputs)` with `inputs[i]` [..., C, d_in_i].
  """
  def apply_layer(i, h):
    z = jnp.matmul(h, weights[i], precision=precision)
    return z if shifts is None else z + shifts[i]

  return compose(apply_layer, x, len(weights), activation)


def gradient_factors(weights: Sequence[jax.Array], keys: jax.Array,
                     error: Callable[[jax.Array], jax.Array], activation: str,
                     precision=None) -> Tuple[List[jax.Array], List[jax.Array]]:
  """Per-token loss gradients at `weights`, as rank-1 factors of each layer.

  All tokens go through one batched forward pass; one vjp with respect to zero shifts of
  the pre-activations then gives every token's `delta` at every layer (each token's loss
  depends only on its own row, so the summed loss separates).

  Args:
    weights: per-layer weights [..., d_in_i, d_out_i].
    keys: [..., C, K].
    error: maps the predictions [..., C, V] to `d loss / d prediction` (same shape).
    activation: name of sigma.
    precision: matmul precision.

  Returns:
    `(inputs, deltas)`: the gradient of token c's loss with respect to layer i is
    `outer(inputs[i][..., c, :], deltas[i][..., c, :])`; inputs[i] [..., C, d_in_i],
    deltas[i] [..., C, d_out_i].
  """
  lead = keys.shape[:-1]
  zeros = [jnp.zeros(lead + (w.shape[-1],), keys.dtype) for w in weights]
  run = lambda shifts: forward(weights, keys, activation, precision, shifts)
  prediction, pullback, inputs = jax.vjp(run, zeros, has_aux=True)
  (deltas,) = pullback(error(prediction))
  return inputs, deltas
