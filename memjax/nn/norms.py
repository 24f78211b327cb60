"""Normalisation layers used by the mixers and the models."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from memjax.nn.partitioning import partitioned


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
  """Divides `x` by the root mean square of its last axis, computed in float32."""
  x32 = x.astype(jnp.float32)
  return x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Scales the last axis of `x` to unit L2 norm (keys and queries of the delta rules)."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True) + eps)).astype(x.dtype)


class RMSNorm(nn.Module):
  """RMS normalisation over the last axis with a learned scale (initialised to 1).

  The scale's axis is named "embed": the layer normalises the model's features.

  Attributes:
    eps: added to the mean square before the square root.
  """
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[..., D] -> [..., D] in the dtype of `x`."""
    scale = self.param("scale", partitioned(nn.initializers.ones, ("embed",)), (x.shape[-1],),
                       jnp.float32)
    return (rms_normalize(x, self.eps) * scale).astype(x.dtype)


class GatedRMSNorm(nn.Module):
  """`RMSNorm(x) * silu(gate)`: the output norm of the Gated DeltaNet mixers.

  Applied per head, so the learned scale has the size of one head's value dim, shared by
  the heads: its axis is never split (logical name None).
  """
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array, gate: jax.Array) -> jax.Array:
    """x, gate: [..., V] -> [..., V] in the dtype of `x`."""
    scale = self.param("scale", partitioned(nn.initializers.ones, (None,)), (x.shape[-1],),
                       jnp.float32)
    y = rms_normalize(x, self.eps) * scale * jax.nn.silu(gate.astype(jnp.float32))
    return y.astype(x.dtype)
