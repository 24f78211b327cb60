"""Helpers of the chunkwise-parallel ("xla") forms of linear attention and the delta rules.

A sequence of T tokens is padded to N * C tokens and cut into N chunks of C tokens. Inside a
chunk everything is a matmul; across chunks a short sequential scan carries the state.
Padding tokens have k = v = 0, beta = 0 and g = 0, so they leave the state unchanged.
"""

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax


def to_chunks(x: jax.Array, chunk_size: int) -> jax.Array:
  """Pads the time axis with zeros and splits it into chunks, heads first.

  Args:
    x: [B, T, H, ...].
    chunk_size: C.

  Returns:
    [B, H, N, C, ...] with N = ceil(T / C).
  """
  t = x.shape[1]
  n = -(-t // chunk_size)
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, n * chunk_size - t)
  x = jnp.pad(x, pad)
  x = x.reshape(x.shape[:1] + (n, chunk_size) + x.shape[2:])
  return jnp.moveaxis(x, 3, 1)


def from_chunks(x: jax.Array, length: int) -> jax.Array:
  """Inverse of `to_chunks`: [B, H, N, C, ...] -> [B, T, H, ...] with T = `length`."""
  x = jnp.moveaxis(x, 1, 3)
  x = x.reshape(x.shape[:1] + (-1,) + x.shape[3:])
  return x[:, :length]


def decays(g_chunks: Optional[jax.Array], chunk_size: int, like: jax.Array):
  """Cumulative log-decays inside each chunk and the causal decay matrix.

  Args:
    g_chunks: log-decays [B, H, N, C] (<= 0), or None for no decay.
    chunk_size: C.
    like: an array [B, H, N, C, ...] whose leading dims and dtype the results take.

  Returns:
    A tuple `(gamma, causal)`:
      gamma: [B, H, N, C], the sum of g over the chunk up to and including each token.
      causal: [B, H, N, C, C], `exp(gamma_i - gamma_j)` for j <= i and 0 above the diagonal.
  """
  mask = jnp.tril(jnp.ones((chunk_size, chunk_size), bool))
  if g_chunks is None:
    gamma = jnp.zeros(like.shape[:4], like.dtype)
    return gamma, jnp.broadcast_to(mask.astype(like.dtype), like.shape[:4] + (chunk_size,))
  gamma = jnp.cumsum(g_chunks.astype(like.dtype), axis=-1)
  diff = gamma[..., :, None] - gamma[..., None, :]
  # Above the diagonal diff > 0 and exp could overflow: mask before the exp, not after,
  # so neither the values nor the gradients see an inf.
  causal = jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0.0)), 0.0)
  return gamma, causal


def matmul_precision(dtype) -> lax.Precision:
  """float32 inputs get full-precision matmuls (no TF32 on GPUs); narrower ones the default."""
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def scan_chunks(step, state: jax.Array, xs: Tuple[jax.Array, ...]):
  """Runs `step(state, x) -> (state, y)` over the chunk axis (axis 2) of each of `xs`.

  Args:
    step: the per-chunk state update.
    state: the state entering the first chunk, [B, H, K, V].
    xs: per-chunk inputs, each [B, H, N, ...].

  Returns:
    `(final_state, ys)` with each of `ys` stacked back on axis 2: [B, H, N, ...].
  """
  final, ys = lax.scan(step, state, tuple(jnp.moveaxis(x, 2, 0) for x in xs))
  return final, jax.tree.map(lambda y: jnp.moveaxis(y, 0, 2), ys)


def invert_unit_lower(lower: jax.Array) -> jax.Array:
  """Inverse of `I + lower` for strictly lower-triangular `lower`, by block doubling.

  Starting from the 1x1 diagonal blocks (all 1), each level joins pairs of neighbouring
  diagonal blocks with `[[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]]`, so the
  whole inverse takes log2(C) levels of small batched matmuls. This is the same arithmetic
  as forward substitution, ordered for matmul units, and avoids a LAPACK/cuBLAS triangular
  solve per chunk.

  Args:
    lower: [..., C, C]; entries on and above the diagonal are ignored.

  Returns:
    `(I + tril(lower, -1))^-1`, [..., C, C], unit lower triangular.
  """
  size = lower.shape[-1]
  padded = 1 << (size - 1).bit_length()
  # Padding with zeros keeps the matrix unit lower triangular; its inverse's leading
  # block is the inverse we want.
  pad = [(0, 0)] * (lower.ndim - 2) + [(0, padded - size)] * 2
  lower = jnp.tril(jnp.pad(lower, pad), -1)
  batch = lower.shape[:-2]
  blocks = jnp.ones(batch + (padded, 1, 1), lower.dtype)  # inverses of the 1x1 diagonal blocks
  width = 1
  while width < padded:
    n = padded // (2 * width)
    tiles = lower.reshape(batch + (n, 2 * width, n, 2 * width))
    # Diagonal 2w x 2w tiles; their lower-left w x w quarter couples the two halves.
    coupling = jnp.einsum("...iaib->...iab", tiles)[..., width:, :width]
    first, second = blocks[..., 0::2, :, :], blocks[..., 1::2, :, :]
    joined = -jnp.einsum("...iab,...ibc,...icd->...iad", second, coupling, first,
                         precision=lax.Precision.HIGHEST)
    top = jnp.concatenate([first, jnp.zeros_like(first)], axis=-1)
    bottom = jnp.concatenate([joined, second], axis=-1)
    blocks = jnp.concatenate([top, bottom], axis=-2)
    width *= 2
  return blocks[..., 0, :size, :size]
