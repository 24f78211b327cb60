"""The (gated) delta rule and (gated) linear attention on TPUs: Pallas via Mosaic.

The same two passes as the GPU kernels (see `common`). Mosaic tiles the last two dimensions
of a block, so the kernels work on a heads-first [B, H, T, D] copy of the inputs (the gates
as [B, H, 1, T]) and transpose the results back. The state pass walks the chunks as the
last ("arbitrary") grid axis with the state in a VMEM scratch buffer.

Checked in TPU interpret mode only: no TPU was at hand to compile it on.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from memjax.kernels import compat
from memjax.kernels.delta_rule import common


def _heads_first(x):
  """[B, T, H, D] -> [B, H, T, D]; gates [B, T, H] -> [B, H, 1, T]."""
  if x.ndim == 3:
    return jnp.moveaxis(x, 1, 2)[:, :, None, :]
  return jnp.moveaxis(x, 1, 2)


def _time_second(x):
  """[B, H, T, D] -> [B, T, H, D]."""
  return jnp.moveaxis(x, 2, 1)


def _wy_kernel(k_ref, v_ref, beta_ref, gamma_ref, w_ref, u_ref, *, chunk, precise):
  """k, w [C, K]; v, u [C, V]: one chunk of one head; beta, gamma [1, T]: the whole head."""
  start = pl.program_id(2) * chunk
  tile = common.tile
  gate_tile = lambda i: pl.ds(start + i * common.SUB, common.SUB)
  common.wy_chunk(
      load_k=lambda i: k_ref[tile(i), :], load_v=lambda i: v_ref[tile(i), :],
      load_beta=lambda i: beta_ref[0, gate_tile(i)],
      load_gamma=lambda i: gamma_ref[0, gate_tile(i)],
      store_w=common.tile_writer(w_ref), store_u=common.tile_writer(u_ref), chunk=chunk,
      precise=precise)


def wy(k, v, beta, gamma, *, chunk, interpret):
  """W and U of every chunk, [B, T, H, K] and [B, T, H, V] in k's dtype (T % chunk == 0)."""
  k, v, beta, gamma = map(_heads_first, (k, v, beta, gamma))
  b, h, t, dk = k.shape
  dv = v.shape[-1]
  rows = lambda d: pl.BlockSpec((None, None, chunk, d), lambda i, j, n: (i, j, n, 0))
  gates = pl.BlockSpec((None, None, 1, t), lambda i, j, n: (i, j, 0, 0))
  kernel = functools.partial(_wy_kernel, chunk=chunk, precise=k.dtype == jnp.float32)
  w, u = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, k.dtype)),
      grid=(b, h, t // chunk),
      in_specs=[rows(dk), rows(dv), gates, gates],
      out_specs=(rows(dk), rows(dv)),
      compiler_params=compat.tpu_params(("parallel", "parallel", "parallel")),
      interpret=interpret,
      name="delta_rule_wy",
  )(k, v, beta, gamma)
  return _time_second(w), _time_second(u)


def _state_kernel(*refs, chunk, scale, precise, delta):
  """q, k, w [C, K]; u, o [C, Vb]: one chunk; gamma [1, T]; state0, final, state [K, Vb]."""
  if delta:
    q_ref, k_ref, u_ref, w_ref, gamma_ref, state0_ref, o_ref, final_ref, state_ref = refs
  else:
    q_ref, k_ref, u_ref, gamma_ref, state0_ref, o_ref, final_ref, state_ref = refs
    w_ref = None
  n = pl.program_id(3)

  @pl.when(n == 0)
  def _():
    state_ref[...] = state0_ref[...]

  start = n * chunk
  o, state = common.state_chunk(
      q_ref[...], k_ref[...], u_ref[...], w_ref[...] if delta else None,
      gamma_ref[0, pl.ds(start, chunk)], gamma_ref[0, start + chunk - 1], state_ref[...],
      scale, precise)
  o_ref[...] = o.astype(o_ref.dtype)
  state_ref[...] = state

  @pl.when(n == pl.num_programs(3) - 1)
  def _():
    final_ref[...] = state


def state(q, k, u, w, gamma, state0, *, chunk, value_block, scale, out_dtype, interpret):
  """Outputs [B, T, H, V] and final state [B, H, K, V] (float32) of the state pass.

  Arguments as in `memjax.kernels.delta_rule.gpu.state`.
  """
  delta = w is not None
  q, k, u, gamma = map(_heads_first, (q, k, u, gamma))
  b, h, t, dk = q.shape
  dv = u.shape[-1]
  keys = pl.BlockSpec((None, None, chunk, dk), lambda i, j, c, n: (i, j, n, 0))
  values = pl.BlockSpec((None, None, chunk, value_block), lambda i, j, c, n: (i, j, n, c))
  gates = pl.BlockSpec((None, None, 1, t), lambda i, j, c, n: (i, j, 0, 0))
  states = pl.BlockSpec((None, None, dk, value_block), lambda i, j, c, n: (i, j, 0, c))
  kernel = functools.partial(_state_kernel, chunk=chunk, scale=scale,
                             precise=q.dtype == jnp.float32, delta=delta)
  inputs = [q, k, u] + ([_heads_first(w)] if delta else []) + [gamma, state0]
  in_specs = [keys, keys, values] + ([keys] if delta else []) + [gates, states]
  o, final = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((b, h, t, dv), out_dtype),
                 jax.ShapeDtypeStruct(state0.shape, jnp.float32)),
      grid=(b, h, dv // value_block, t // chunk),
      in_specs=in_specs,
      out_specs=(values, states),
      scratch_shapes=[pltpu.VMEM((dk, value_block), jnp.float32)],
      compiler_params=compat.tpu_params(("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="delta_rule_state" if delta else "linear_attention_state",
  )(*inputs)
  return _time_second(o), final
