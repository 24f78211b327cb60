"""The (gated) delta rule and (gated) linear attention on NVIDIA GPUs: Pallas via Triton.

Two `pallas_call`s (see `common`): the `wy` pass, one program per (batch, head, chunk), and
the `state` pass, one program per (batch, head, value block) walking the chunks in order
with the state in registers. Inputs keep the [B, T, H, D] layout: a program's rows are
strided by H * D but each row is contiguous.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from memjax.kernels import compat
from memjax.kernels.delta_rule import common

# From a sweep on an H200 (B=8, T=4096, H=16, K=V=128, bf16; 1-16 warps, 1-3 stages, value
# blocks 32-128): the wy pass is fastest on 2 warps (0.49 ms; 4 warps 0.57, 1 warp 1.27),
# the state pass with 64-column value blocks on 4 warps (0.42 ms; 128 columns on 8 warps
# 0.51-0.66, 2 warps spill: 19 ms).
_WY_WARPS = 2
_STATE_WARPS = 4
_STAGES = 2


def _stages(*arrays) -> int:
  """Software-pipelining depth: one stage when 64-row float32 tiles of width 256 would
  overflow shared memory with two."""
  wide = any(x.shape[-1] * x.dtype.itemsize > 512 for x in arrays)
  return 1 if wide else _STAGES


def _wy_kernel(k_ref, v_ref, beta_ref, gamma_ref, w_ref, u_ref, *, chunk, precise):
  """Refs are one chunk of one head: k, w [C, K]; v, u [C, V]; beta, gamma [C]."""
  tile = common.tile
  common.wy_chunk(
      load_k=lambda i: k_ref[tile(i), :], load_v=lambda i: v_ref[tile(i), :],
      load_beta=lambda i: beta_ref[tile(i)], load_gamma=lambda i: gamma_ref[tile(i)],
      store_w=common.tile_writer(w_ref), store_u=common.tile_writer(u_ref), chunk=chunk,
      precise=precise)


def wy(k, v, beta, gamma, *, chunk, interpret):
  """W and U of every chunk, [B, T, H, K] and [B, T, H, V] in k's dtype (T % chunk == 0)."""
  b, t, h, dk = k.shape
  dv = v.shape[-1]
  rows = lambda d: pl.BlockSpec((None, chunk, None, d), lambda i, j, n: (i, n, j, 0))
  gates = pl.BlockSpec((None, chunk, None), lambda i, j, n: (i, n, j))
  kernel = functools.partial(_wy_kernel, chunk=chunk, precise=k.dtype == jnp.float32)
  return pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, k.dtype)),
      grid=(b, h, t // chunk),
      in_specs=[rows(dk), rows(dv), gates, gates],
      out_specs=(rows(dk), rows(dv)),
      compiler_params=compat.triton_params(_WY_WARPS, _stages(k, v)),
      interpret=interpret,
      name="delta_rule_wy",
  )(k, v, beta, gamma)


def _state_kernel(*refs, chunk, scale, precise, delta):
  """Refs are one head's whole sequence: q, k, w [T, K]; u [T, Vb]; gamma [T];
  state0, final [K, Vb]; o [T, Vb]."""
  if delta:
    q_ref, k_ref, u_ref, w_ref, gamma_ref, state0_ref, o_ref, final_ref = refs
  else:
    q_ref, k_ref, u_ref, gamma_ref, state0_ref, o_ref, final_ref = refs
    w_ref = None

  def step(n, state):
    rows = pl.ds(n * chunk, chunk)
    w = w_ref[rows, :] if delta else None
    o, state = common.state_chunk(
        q_ref[rows, :], k_ref[rows, :], u_ref[rows, :], w, gamma_ref[rows],
        gamma_ref[n * chunk + chunk - 1], state, scale, precise)
    o_ref[rows, :] = o.astype(o_ref.dtype)
    return state

  num_chunks = q_ref.shape[0] // chunk
  final_ref[...] = lax.fori_loop(0, num_chunks, step, state0_ref[...])


def state(q, k, u, w, gamma, state0, *, chunk, value_block, scale, out_dtype, interpret):
  """Outputs [B, T, H, V] and final state [B, H, K, V] (float32) of the state pass.

  Args:
    q, k: [B, T, H, K]; u: U or V [B, T, H, V]; w: W [B, T, H, K] or None (linear
      attention); gamma: [B, T, H] float32 chunk-local cumulative log-decays;
    state0: [B, H, K, V] float32.
  """
  b, t, h, dk = q.shape
  dv = u.shape[-1]
  # The value block is the first grid axis, the fastest-varying one in launch order, so the
  # programs that read the same q, k and w rows run side by side and share them in L2.
  keys = pl.BlockSpec((None, t, None, dk), lambda c, i, j: (i, 0, j, 0))
  values = pl.BlockSpec((None, t, None, value_block), lambda c, i, j: (i, 0, j, c))
  gates = pl.BlockSpec((None, t, None), lambda c, i, j: (i, 0, j))
  states = pl.BlockSpec((None, None, dk, value_block), lambda c, i, j: (i, j, 0, c))
  delta = w is not None
  kernel = functools.partial(_state_kernel, chunk=chunk, scale=scale,
                             precise=q.dtype == jnp.float32, delta=delta)
  inputs = [q, k, u] + ([w] if delta else []) + [gamma, state0]
  in_specs = [keys, keys, values] + ([keys] if delta else []) + [gates, states]
  return pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((b, t, h, dv), out_dtype),
                 jax.ShapeDtypeStruct(state0.shape, jnp.float32)),
      grid=(dv // value_block, b, h),
      in_specs=in_specs,
      out_specs=(values, states),
      compiler_params=compat.triton_params(_STATE_WARPS, _stages(q, u)),
      interpret=interpret,
      name="delta_rule_state" if delta else "linear_attention_state",
  )(*inputs)
