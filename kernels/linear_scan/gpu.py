"""linear_scan on NVIDIA GPUs: a Pallas kernel lowered through Triton.

One program per (batch row, channel block) walks T sequentially. Each step of the walk loads
`blocks.time` rows of a and b up front (independent loads in flight together), then runs the
recurrence through them in float32 registers and stores every state.
"""

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from memjax.kernels import compat
from memjax.kernels.linear_scan import common

# From a sweep on an H200 (B=8, T=4096, C=2048; channels 32-256, time 8-32, 1-4 warps):
# 32 time steps per load group mattered most; 32 channels on one warp was within 4% of the
# best setting for both bf16 and fp32.
DEFAULT_BLOCKS = common.BlockSizes(time=32, channels=32)
_NUM_WARPS = 1
_NUM_STAGES = 2


def _kernel(a_ref, b_ref, h0_ref, h_ref, *, block_t, reverse, adjoint):
  """a_ref, b_ref, h_ref: [T, block_c]; h0_ref: [block_c]."""
  num_blocks = a_ref.shape[0] // block_t
  offsets = range(block_t - 1, -1, -1) if reverse else range(block_t)

  def walk(i, carry):
    h, a_lag = carry
    start = block_t * (num_blocks - 1 - i if reverse else i)
    rows = [start + k for k in offsets]
    a_rows = [a_ref[t].astype(jnp.float32) for t in rows]
    b_rows = [b_ref[t].astype(jnp.float32) for t in rows]
    for t, a_t, b_t in zip(rows, a_rows, b_rows):
      if adjoint:  # The decay of the step visited before: d_t = a_{t+1} d_{t+1} + g_t.
        h, a_lag = a_lag * h + b_t, a_t
      else:
        h = a_t * h + b_t
      h_ref[t] = h.astype(h_ref.dtype)
    return h, a_lag

  h0 = h0_ref[...].astype(jnp.float32)
  lax.fori_loop(0, num_blocks, walk, (h0, jnp.ones_like(h0)))


def _pallas_scan(a, b, h0, reverse, adjoint, blocks, interpret):
  """The pallas_call: a, b [B, T, C] (T, C multiples of the blocks), h0 float32 [B, C]."""
  batch, steps, channels = a.shape
  grid = (batch, channels // blocks.channels)
  seq = pl.BlockSpec((None, steps, blocks.channels), lambda i, j: (i, 0, j))
  kernel = functools.partial(_kernel, block_t=blocks.time, reverse=reverse, adjoint=adjoint)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct(b.shape, b.dtype),
      grid=grid,
      in_specs=[seq, seq, pl.BlockSpec((None, blocks.channels), lambda i, j: (i, j))],
      out_specs=seq,
      compiler_params=compat.triton_params(_NUM_WARPS, _NUM_STAGES),
      interpret=interpret,
      name="linear_scan",
  )(a, b, h0)


_scan = common.differentiable(_pallas_scan)


def linear_scan(
    a: jax.Array,
    b: jax.Array,
    h0: jax.Array,
    *,
    reverse: bool = False,
    blocks: Optional[common.BlockSizes] = None,
    interpret: bool = False,
) -> jax.Array:
  """`h_t = a_t * h_{t-1} + b_t` along axis 1 (inputs validated by `memjax.ops.linear_scan`).

  Args:
    a: decays, [B, T, ...], float32 or bfloat16.
    b: inputs, same shape and dtype as `a`.
    h0: initial state, [B, ...].
    reverse: run from the last step to the first.
    blocks: tile sizes; `blocks.channels` must be a power of two (Triton). Default
      `DEFAULT_BLOCKS`, with the channel block shrunk for few channels.
    interpret: run the kernel body in the Pallas interpreter (CPU tests).

  Returns:
    All states, [B, T, ...], in b's dtype, accumulated in float32.
  """
  if blocks is None:
    channels = math.prod(b.shape[2:])
    blocks = common.BlockSizes(
        time=DEFAULT_BLOCKS.time,
        channels=min(DEFAULT_BLOCKS.channels, pl.next_power_of_2(channels)))
  elif blocks.time < 1 or blocks.channels < 1 or blocks.channels & (blocks.channels - 1):
    raise ValueError(
        f"blocks must have time >= 1 and a power-of-two channels (Triton), got {blocks}")
  a, b, h0_flat, unflatten = common.flatten_and_pad(a, b, h0, blocks)
  h = _scan(a, b, h0_flat, reverse, blocks, interpret)
  return unflatten(h)
