"""Causal softmax attention (optionally sliding-window) with rotary position embeddings."""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


def rotary_embedding(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotates pairs of channels of x by position-dependent angles (RoPE, half-split form).

  Args:
    x: [B, T, H, D] with D even.
    positions: [T] integer positions.
    base: the wavelength base.

  Returns:
    [B, T, H, D] in the dtype of `x`.
  """
  half = x.shape[-1] // 2
  freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[:, None] * freqs  # [T, D/2]
  cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class CausalSelfAttention(nn.Module):
  """Multi-head causal softmax attention through `jax.nn.dot_product_attention`.

  Attributes:
    num_heads: number of heads.
    head_dim: dim of each head's queries, keys and values (even, for RoPE).
    window: if set, each token attends to itself and the `window - 1` tokens before it
      (sliding-window attention); None attends to the whole prefix.
    rope_base: wavelength base of the rotary embeddings.
  """
  num_heads: int = 4
  head_dim: int = 64
  window: Optional[int] = None
  rope_base: float = 10000.0

  @nn.compact
  def __call__(self, x: jax.Array, state=None):
    """Attends over a whole sequence.

    Args:
      x: inputs [B, T, D].
      state: unused; attention keeps no recurrent state here (kept for the mixer interface).

    Returns:
      `(y, None)`: outputs [B, T, D].
    """
    del state
    b, t, d = x.shape
    h, hd = self.num_heads, self.head_dim
    if self.window is not None and self.window < 1:
      raise ValueError(f"window must be None or >= 1, got {self.window}")
    qkv = nn.Dense(3 * h * hd, use_bias=False, name="qkv_proj")(x).reshape(b, t, 3, h, hd)
    positions = jnp.arange(t)
    q = rotary_embedding(qkv[:, :, 0], positions, self.rope_base)
    k = rotary_embedding(qkv[:, :, 1], positions, self.rope_base)
    window = None if self.window is None else (self.window - 1, 0)
    o = jax.nn.dot_product_attention(q, k, qkv[:, :, 2], is_causal=True, local_window_size=window)
    return nn.Dense(d, use_bias=False, name="out_proj")(o.reshape(b, t, h * hd)), None
