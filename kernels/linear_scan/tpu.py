"""linear_scan on TPUs: a Pallas (Mosaic) kernel.

The grid is (batch row, channel block, time block), time last and sequential ("arbitrary"):
Pallas pipelines the [block_t, block_c] tiles of a and b into VMEM, and the running state
lives in a VMEM scratch between time blocks. Inside a tile the recurrence walks one sublane
tile of rows (8 rows of 32-bit, 16 of 16-bit values) at a time, so every load and store is
a whole aligned tile.
"""

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from memjax.kernels import compat
from memjax.kernels.linear_scan import common

DEFAULT_BLOCKS = common.BlockSizes(time=256, channels=512)
_LANES = 128


def _sublane_rows(*dtypes) -> int:
  """Rows of one (sublane, lane) tile for the narrowest dtype: 8 for 32-bit, 16 for 16-bit."""
  return 8 * 4 // min(jnp.dtype(d).itemsize for d in dtypes)


def _kernel(a_ref, b_ref, h0_ref, h_ref, state_ref, lag_ref, *, rows, reverse, adjoint):
  """a_ref, b_ref, h_ref: [block_t, block_c]; h0_ref, state_ref, lag_ref: [1, block_c]."""

  @pl.when(pl.program_id(2) == 0)
  def _():
    state_ref[...] = h0_ref[...].astype(jnp.float32)
    lag_ref[...] = jnp.ones_like(lag_ref)

  groups = a_ref.shape[0] // rows
  offsets = range(rows - 1, -1, -1) if reverse else range(rows)

  def group(i, carry):
    h, a_lag = carry
    start = pl.multiple_of(rows * (groups - 1 - i if reverse else i), rows)
    a = a_ref[pl.ds(start, rows), :].astype(jnp.float32)
    b = b_ref[pl.ds(start, rows), :].astype(jnp.float32)
    row = lax.broadcasted_iota(jnp.int32, a.shape, 0)
    out = jnp.zeros_like(a)
    for k in offsets:
      a_k, b_k = a[k:k + 1], b[k:k + 1]
      if adjoint:  # The decay of the step visited before: d_t = a_{t+1} d_{t+1} + g_t.
        h, a_lag = a_lag * h + b_k, a_k
      else:
        h = a_k * h + b_k
      out = jnp.where(row == k, h, out)
    h_ref[pl.ds(start, rows), :] = out.astype(h_ref.dtype)
    return h, a_lag

  h, a_lag = lax.fori_loop(0, groups, group, (state_ref[...], lag_ref[...]))
  state_ref[...] = h
  lag_ref[...] = a_lag


def _pallas_scan(a, b, h0, reverse, adjoint, blocks, interpret):
  """The pallas_call: a, b [B, T, C] (T, C multiples of the blocks), h0 float32 [B, C]."""
  batch, steps, channels = a.shape
  num_t = steps // blocks.time
  grid = (batch, channels // blocks.channels, num_t)
  time_block = (lambda t: num_t - 1 - t) if reverse else (lambda t: t)
  seq = pl.BlockSpec((None, blocks.time, blocks.channels),
                     lambda i, j, t: (i, time_block(t), j))
  state = pl.BlockSpec((None, 1, blocks.channels), lambda i, j, t: (i, 0, j))
  kernel = functools.partial(_kernel, rows=_sublane_rows(a.dtype, b.dtype), reverse=reverse,
                             adjoint=adjoint)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct(b.shape, b.dtype),
      grid=grid,
      in_specs=[seq, seq, state],
      out_specs=seq,
      scratch_shapes=[pltpu.VMEM((1, blocks.channels), jnp.float32)] * 2,
      compiler_params=compat.tpu_params(("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="linear_scan",
  )(a, b, h0[:, None, :])


_scan = common.differentiable(_pallas_scan)


def linear_scan(
    a: jax.Array,
    b: jax.Array,
    h0: jax.Array,
    *,
    reverse: bool = False,
    blocks: Optional[common.BlockSizes] = None,
    interpret=False,
) -> jax.Array:
  """`h_t = a_t * h_{t-1} + b_t` along axis 1 (inputs validated by `memjax.ops.linear_scan`).

  Args:
    a: decays, [B, T, ...], float32 or bfloat16.
    b: inputs, same shape as `a`.
    h0: initial state, [B, ...].
    reverse: run from the last step to the first.
    blocks: tile sizes; `blocks.time` a multiple of 16 (8 when a and b are 32-bit),
      `blocks.channels` a multiple of 128. Default `DEFAULT_BLOCKS`, shrunk for short or
      narrow inputs.
    interpret: False, or `compat.tpu_interpret()` to run the kernel body on the CPU.

  Returns:
    All states, [B, T, ...], in b's dtype, accumulated in float32.
  """
  if blocks is None:
    blocks = common.BlockSizes(
        time=min(DEFAULT_BLOCKS.time, common.round_up(a.shape[1], 16)),
        channels=min(DEFAULT_BLOCKS.channels,
                     common.round_up(math.prod(a.shape[2:]), _LANES)))
  else:
    rows = 8 if a.dtype.itemsize == 4 and b.dtype.itemsize == 4 else 16
    if blocks.time < 1 or blocks.time % rows or blocks.channels < 1 or blocks.channels % _LANES:
      raise ValueError(
          f"blocks.time must be a positive multiple of {rows} and blocks.channels of "
          f"{_LANES} for {a.dtype}/{b.dtype} inputs on TPU, got {blocks}")
  a, b, h0_flat, unflatten = common.flatten_and_pad(a, b, h0, blocks)
  h = _scan(a, b, h0_flat, reverse, blocks, interpret)
  return unflatten(h)
