"""The (gated) delta rule and (gated) linear attention on NVIDIA GPUs: Pallas via Triton.

Two `pallas_call`s (see `common`): the `wy` pass, one program per (batch, head, chunk), and
the `state` pass, one program per (batch, head, value block) walking the chunks in order
with the state in registers. Inputs keep the [B, T, H, D] layout: a program's rows are
strided by H * D but each row is contiguous.

The backward (see `backward`) has the same shape: `state_grad` walks the chunks in reverse
with the state cotangent in registers, one program per (value block, batch, head), and
`qk_grads` and `wy_grads` run one program per (key block,) batch, head and chunk on the
saved chunk states.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from memjax.kernels import compat
from memjax.kernels.delta_rule import backward
from memjax.kernels.delta_rule import common

# From a sweep on an H200 (B=8, T=4096, H=16, K=V=128, bf16; 1-16 warps, 1-3 stages, value
# blocks 32-128): the wy pass is fastest on 2 warps (0.49 ms; 4 warps 0.57, 1 warp 1.27),
# the state pass with 64-column value blocks on 4 warps (0.42 ms; 128 columns on 8 warps
# 0.51-0.66, 2 warps spill: 19 ms).
_WY_WARPS = 2
_STATE_WARPS = 4
_STAGES = 2
# The wy pass that also builds the chunk inverses for the backward holds four more
# [16, 64] float32 tiles: 4 warps 0.62 ms, 2 warps 0.71, 8 warps 1.04 (H100, same shape).
_WY_INVERSE_WARPS = 4
# The backward's per-chunk passes (H100, same shape, each pass alone): qk_grads 0.78 ms on
# 4 warps with 64-column key blocks and the whole 128 value columns per loop step (64
# columns 0.92, 32 columns 1.28; 8 warps 1.29, 2 warps spill: 2.9; 32-column key blocks
# 0.96-1.11), wy_grads 0.59 ms on 4 warps with 64-column blocks (32 columns 0.78, 128 on 8
# warps 0.79, 64 on 8 warps 0.97).
_GRAD_WARPS = 4
_WY_GRAD_WARPS = 4
# Columns of K per program of qk_grads, and of K and V per loop step of wy_grads.
BACKWARD_BLOCK = 64
# Columns of V per loop step of qk_grads, by the inputs' bytes per element. float32 keeps
# the 64 columns of its earlier GPU checks (D 64 and 128): its tiles are twice the size, and
# 128 columns of it were not compiled on a GPU.
QK_GRADS_VALUE_BLOCK = {2: 128, 4: 64}
# Value columns per program of the forward state pass (64: 0.42 ms at the shape above on an
# H200), and of the backward one by op: the delta rule's 32 (0.71 ms against 1.13 ms with
# 64 on an H100; its reverse walk carries a second [C, Vb] product, through W), linear
# attention's 64 (0.43 ms against 0.53 with 32, H100).
STATE_VALUE_BLOCK = 64
STATE_GRAD_VALUE_BLOCK = {"delta": 32, "linear": 64}
# The walks run one program per (value block, batch, head), each sequential over the
# chunks, so with few heads most SMs idle: `chunked.walk_value_block` halves the blocks, down
# to 16 columns, until there are 128 programs (an H100 and an H200 have 132 SMs). H100,
# H16 D128 bf16, gdn forward with 64 / 32 / 16 columns: B1-T64K 5.90 / 4.33 / 3.72 ms,
# B2-T16K 1.37 / 1.27 / 1.33, B16-T4K (512 programs at 64) 1.64 / 1.92 / 2.57.
MIN_WALK_VALUE_BLOCK = 16
MIN_WALK_PROGRAMS = 128


# A walk of at most `MIN_WALK_PROGRAMS` programs runs one program per SM, with no second
# program to hide its loads behind, so it prefetches one chunk further instead (3 stages;
# the shared memory this takes would otherwise hold a second program). H100, H16 D128 bf16,
# gdn, 2 against 3 stages, state pass / state_grad pass: B1-T64K (128 programs of 16
# columns) 2.77 / 2.07 ms and 4.42 / 2.53; B2-T32K (128 of 32) 1.43 / 1.02 and 1.65 / 1.33;
# B4-T16K state (128 of 64) 0.92 / 0.78, its state_grad (256 of 32) 1.12 / 1.33; B8-T4K
# (256 and 512 programs) 0.33 / 0.41 and 0.58 / 0.69.
_DEEP_STAGES = 3


def pipeline_stages(*arrays, programs=None) -> int:
  """Software-pipelining depth of a pass over `arrays`' rows, `programs` its grid size (for
  the walks): one stage when 64-row float32 tiles of width 256 would overflow shared memory
  with two; three for a walk of at most `MIN_WALK_PROGRAMS` programs whose rows are at
  most 256 bytes (three stages of wider tiles do not fit)."""
  row_bytes = max(x.shape[-1] * x.dtype.itemsize for x in arrays)
  if row_bytes > 512:
    return 1
  if programs is not None and programs <= MIN_WALK_PROGRAMS and row_bytes <= 256:
    return _DEEP_STAGES
  return _STAGES


def _wy_kernel(k_ref, v_ref, beta_ref, gamma_ref, w_ref, u_ref, *a_ref, chunk, precise):
  """Refs are one chunk of one head: k, w [C, K]; v, u [C, V]; beta, gamma [C]; a [C, C]
  (the inverse `(I + L)^-1`, only when asked for)."""
  tile = common.tile
  common.wy_chunk(
      load_k=lambda i: k_ref[tile(i), :], load_v=lambda i: v_ref[tile(i), :],
      load_beta=lambda i: beta_ref[tile(i)], load_gamma=lambda i: gamma_ref[tile(i)],
      store_w=common.tile_writer(w_ref), store_u=common.tile_writer(u_ref), chunk=chunk,
      precise=precise, store_a=common.tile_writer(a_ref[0]) if a_ref else None)


def wy(k, v, beta, gamma, *, chunk, interpret, inverse=False):
  """W and U of every chunk, [B, T, H, K] and [B, T, H, V] in k's dtype (T % chunk == 0);
  with `inverse`, also every chunk's `(I + L)^-1` as [B, T, H, C] in k's dtype (row t
  holds its chunk's row t % C; the backward uses it only as a matmul operand)."""
  b, t, h, dk = k.shape
  dv = v.shape[-1]
  rows = lambda d: pl.BlockSpec((None, chunk, None, d), lambda i, j, n: (i, n, j, 0))
  gates = pl.BlockSpec((None, chunk, None), lambda i, j, n: (i, n, j))
  kernel = functools.partial(_wy_kernel, chunk=chunk, precise=k.dtype == jnp.float32)
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, k.dtype)]
  out_specs = [rows(dk), rows(dv)]
  if inverse:
    out_shape.append(jax.ShapeDtypeStruct((b, t, h, chunk), k.dtype))
    out_specs.append(rows(chunk))
  return pl.pallas_call(
      kernel,
      out_shape=tuple(out_shape),
      grid=(b, h, t // chunk),
      in_specs=[rows(dk), rows(dv), gates, gates],
      out_specs=tuple(out_specs),
      compiler_params=compat.triton_params(_WY_INVERSE_WARPS if inverse else _WY_WARPS,
                                           pipeline_stages(k, v)),
      interpret=interpret,
      name="delta_rule_wy",
  )(k, v, beta, gamma)


def _state_kernel(*refs, chunk, scale, precise, delta, save_residuals):
  """Refs are one head's whole sequence: q, k, w [T, K]; u [T, Vb]; gamma [T];
  state0, final [K, Vb]; o [T, Vb]; with `save_residuals`, starts [N, K, Vb] and (delta
  rule) vn [T, Vb]."""
  refs = list(refs)
  vn_ref = refs.pop() if save_residuals and delta else None
  starts_ref = refs.pop() if save_residuals else None
  if delta:
    q_ref, k_ref, u_ref, w_ref, gamma_ref, state0_ref, o_ref, final_ref = refs
  else:
    q_ref, k_ref, u_ref, gamma_ref, state0_ref, o_ref, final_ref = refs
    w_ref = None

  def step(n, state):
    rows = pl.ds(n * chunk, chunk)
    if save_residuals:
      starts_ref[n, :, :] = state.astype(starts_ref.dtype)
    w = w_ref[rows, :] if delta else None
    o, state, v_new = common.state_chunk(
        q_ref[rows, :], k_ref[rows, :], u_ref[rows, :], w, gamma_ref[rows],
        gamma_ref[n * chunk + chunk - 1], state, scale, precise)
    o_ref[rows, :] = o.astype(o_ref.dtype)
    if vn_ref is not None:
      vn_ref[rows, :] = v_new.astype(vn_ref.dtype)
    return state

  num_chunks = q_ref.shape[0] // chunk
  final_ref[...] = lax.fori_loop(0, num_chunks, step, state0_ref[...])


def state(q, k, u, w, gamma, state0, *, chunk, value_block, scale, out_dtype, interpret,
          save_residuals=False):
  """Outputs [B, T, H, V] and final state [B, H, K, V] (float32) of the state pass.

  Args:
    q, k: [B, T, H, K]; u: U or V [B, T, H, V]; w: W [B, T, H, K] or None (linear
      attention); gamma: [B, T, H] float32 chunk-local cumulative log-decays;
    state0: [B, H, K, V] float32.
    save_residuals: also return what the backward reads: every chunk's start state
      [B, H, N, K, V] and, for the delta rule, Vn = U - W S0 [B, T, H, V], both in q's
      dtype (the backward's matmuls round their operands to it anyway).
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
                             precise=q.dtype == jnp.float32, delta=delta,
                             save_residuals=save_residuals)
  inputs = [q, k, u] + ([w] if delta else []) + [gamma, state0]
  in_specs = [keys, keys, values] + ([keys] if delta else []) + [gates, states]
  out_shape = [jax.ShapeDtypeStruct((b, t, h, dv), out_dtype),
               jax.ShapeDtypeStruct(state0.shape, jnp.float32)]
  out_specs = [values, states]
  if save_residuals:
    out_shape.append(jax.ShapeDtypeStruct((b, h, t // chunk, dk, dv), q.dtype))
    out_specs.append(_chunk_states(t // chunk, dk, value_block))
    if delta:
      out_shape.append(jax.ShapeDtypeStruct((b, t, h, dv), q.dtype))
      out_specs.append(values)
  return pl.pallas_call(
      kernel,
      out_shape=tuple(out_shape),
      grid=(dv // value_block, b, h),
      in_specs=in_specs,
      out_specs=tuple(out_specs),
      compiler_params=compat.triton_params(
          _STATE_WARPS, pipeline_stages(q, u, programs=b * h * (dv // value_block))),
      interpret=interpret,
      name="delta_rule_state" if delta else "linear_attention_state",
  )(*inputs)


def _chunk_states(num_chunks, dk, value_block):
  """Block of one head's per-chunk states [N, K, Vb] in [B, H, N, K, V] (state-pass grid)."""
  return pl.BlockSpec((None, None, num_chunks, dk, value_block),
                      lambda c, i, j: (i, j, 0, 0, c))


def _state_grad_kernel(*refs, chunk, scale, precise, delta):
  """Refs are one head's whole sequence: q, k, w [T, K]; do, dvn [T, Vb]; gamma [T];
  dfinal, dstate0 [K, Vb]; dends [N, K, Vb]."""
  if delta:
    q_ref, k_ref, w_ref, *refs = refs
  else:
    (q_ref, k_ref, *refs), w_ref = refs, None
  do_ref, gamma_ref, dfinal_ref, dends_ref, dvn_ref, dstate0_ref = refs
  num_chunks = q_ref.shape[0] // chunk

  def step(i, dstate):
    n = num_chunks - 1 - i
    rows = pl.ds(n * chunk, chunk)
    dends_ref[n, :, :] = dstate.astype(dends_ref.dtype)
    w = w_ref[rows, :] if delta else None
    dstate, dv_new = backward.state_grad_chunk(
        q_ref[rows, :], k_ref[rows, :], w, do_ref[rows, :], gamma_ref[rows],
        gamma_ref[n * chunk + chunk - 1], dstate, scale, precise)
    dvn_ref[rows, :] = dv_new.astype(dvn_ref.dtype)
    return dstate

  dstate0_ref[...] = lax.fori_loop(0, num_chunks, step, dfinal_ref[...])


def state_grad(q, k, w, do, gamma, dfinal, *, chunk, value_block, scale, interpret):
  """Backward state pass: the chunks in reverse, the state cotangent on chip.

  Args:
    q, k: [B, T, H, K]; w: W [B, T, H, K] or None (linear attention); do: output cotangent
      [B, T, H, V]; gamma: [B, T, H] float32; dfinal: final-state cotangent [B, H, K, V].

  Returns:
    `(dends, dvn, dstate0)`: the cotangents of every chunk's end state [B, H, N, K, V]
    and of Vn [B, T, H, V] (see `backward`) in q's dtype (read only as matmul operands),
    and of the initial state [B, H, K, V] float32.
  """
  b, t, h, dk = q.shape
  dv = do.shape[-1]
  keys = pl.BlockSpec((None, t, None, dk), lambda c, i, j: (i, 0, j, 0))
  values = pl.BlockSpec((None, t, None, value_block), lambda c, i, j: (i, 0, j, c))
  gates = pl.BlockSpec((None, t, None), lambda c, i, j: (i, 0, j))
  states = pl.BlockSpec((None, None, dk, value_block), lambda c, i, j: (i, j, 0, c))
  delta = w is not None
  kernel = functools.partial(_state_grad_kernel, chunk=chunk, scale=scale,
                             precise=q.dtype == jnp.float32, delta=delta)
  inputs = [q, k] + ([w] if delta else []) + [do, gamma, dfinal.astype(jnp.float32)]
  in_specs = [keys, keys] + ([keys] if delta else []) + [values, gates, states]
  return pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((b, h, t // chunk, dk, dv), q.dtype),
                 jax.ShapeDtypeStruct((b, t, h, dv), q.dtype),
                 jax.ShapeDtypeStruct(dfinal.shape, jnp.float32)),
      grid=(dv // value_block, b, h),
      in_specs=in_specs,
      out_specs=(_chunk_states(t // chunk, dk, value_block), values, states),
      compiler_params=compat.triton_params(
          _STATE_WARPS, pipeline_stages(q, do, programs=b * h * (dv // value_block))),
      interpret=interpret,
      name="delta_rule_state_grad" if delta else "linear_attention_state_grad",
  )(*inputs)


def _block_access(ref):
  """`load(name, cols)` and `store(name, value, cols)` over a dict of refs: the whole block
  when `cols` is None, else its column block `cols`."""
  def load(name, cols):
    return ref[name][...] if cols is None else ref[name][:, cols]

  def store(name, value, cols=None):
    if cols is None:
      ref[name][...] = value.astype(ref[name].dtype)
    else:
      ref[name][:, cols] = value.astype(ref[name].dtype)
  return load, store


def _qk_grads_kernel(*refs, names, value_block, scale, precise, delta):
  """Refs (named by `names`) are one chunk of one head: q, k, w, dq, dk, dw [C, Kb] (one
  key block); do, vn, dvn [C, V]; gamma, dgamma [C]; state0, dstate1 [Kb, V]."""
  ref = dict(zip(names, refs))
  load, store = _block_access(ref)
  chunk = ref["gamma"].shape[0]
  backward.qk_grads_chunk(load, ref["gamma"][...], ref["gamma"][chunk - 1], store,
                          value_dim=ref["do"].shape[1], value_block=value_block,
                          scale=scale, precise=precise, delta=delta)


def qk_grads(q, k, w, do, vn, dvn, gamma, starts, dends, *, chunk, key_block, value_block,
             scale, interpret):
  """Backward pass 2 (see `backward`): one program per (key block, batch, head, chunk).

  Args:
    q, k: [B, T, H, K]; w: W [B, T, H, K] or None (linear attention); do, vn, dvn: the
      output cotangent, Vn (V for linear attention) and dVn [B, T, H, V]; gamma: [B, T, H]
      float32; starts, dends: every chunk's start state and end-state cotangent
      [B, H, N, K, V]; vn, dvn, starts and dends in q's dtype.
    key_block, value_block: columns of K per program and of V per step of its loop.

  Returns:
    `(dq, dk, dw, dgamma)`: dq [B, T, H, K] in q's dtype; this pass's part of dk
    [B, T, H, K] in q's dtype and of dgamma [K / key_block, B, T, H] in float32; dW
    [B, T, H, K] in q's dtype (None for linear attention).
  """
  b, t, h, dk = q.shape
  dv = do.shape[-1]
  delta = w is not None
  # The key block is the first grid axis: the programs of one chunk run side by side and
  # share its do, vn and dvn rows in L2.
  keys = pl.BlockSpec((None, chunk, None, key_block), lambda c, i, j, n: (i, n, j, c))
  rows = pl.BlockSpec((None, chunk, None, dv), lambda c, i, j, n: (i, n, j, 0))
  gates = pl.BlockSpec((None, chunk, None), lambda c, i, j, n: (i, n, j))
  states = pl.BlockSpec((None, None, None, key_block, dv),
                        lambda c, i, j, n: (i, j, n, c, 0))
  inputs = {"q": (q, keys), "k": (k, keys), "do": (do, rows), "vn": (vn, rows),
            "dvn": (dvn, rows), "gamma": (gamma, gates), "state0": (starts, states),
            "dstate1": (dends, states)}
  if delta:
    inputs["w"] = (w, keys)
  f32 = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  outputs = {"dq": (jax.ShapeDtypeStruct(q.shape, q.dtype), keys),
             # In q's dtype: wy_grads only adds it to its own part, and the sum is rounded
             # to k's dtype anyway; in float32 it cost 0.1 ms of HBM traffic at 8-4096.
             "dk": (jax.ShapeDtypeStruct(k.shape, q.dtype), keys),
             "dgamma": (f32((dk // key_block, b, t, h)),
                        pl.BlockSpec((None, None, chunk, None), lambda c, i, j, n: (c, i, n, j)))}
  if delta:
    outputs["dw"] = (jax.ShapeDtypeStruct(k.shape, q.dtype), keys)
  kernel = functools.partial(
      _qk_grads_kernel, names=tuple(inputs) + tuple(outputs), value_block=value_block,
      scale=scale, precise=q.dtype == jnp.float32, delta=delta)
  grads = pl.pallas_call(
      kernel,
      out_shape=tuple(shape for shape, _ in outputs.values()),
      grid=(dk // key_block, b, h, t // chunk),
      in_specs=[spec for _, spec in inputs.values()],
      out_specs=tuple(spec for _, spec in outputs.values()),
      compiler_params=compat.triton_params(_GRAD_WARPS, 1),
      interpret=interpret,
      name="delta_rule_qk_grads" if delta else "linear_attention_qk_grads",
  )(*(array for array, _ in inputs.values()))
  grads = dict(zip(outputs, grads))
  return grads["dq"], grads["dk"], grads.get("dw"), grads["dgamma"]


def _wy_grads_kernel(*refs, names, block, precise):
  """Refs (named by `names`) are one chunk of one head: k, dw, dk_part, dk [C, K];
  a [C, C]; v, dvn, dv [C, V]; beta, gamma, dbeta, dgamma [C]."""
  ref = dict(zip(names, refs))
  load, store = _block_access(ref)
  backward.wy_grads_chunk(load, ref["beta"][...].astype(jnp.float32), ref["gamma"][...],
                          store, key_dim=ref["k"].shape[1], value_dim=ref["v"].shape[1],
                          block=block, precise=precise)


def wy_grads(k, v, a, beta, gamma, dw, dvn, dk, *, chunk, block, interpret):
  """Backward pass 3 (see `backward`; delta rule only): one program per (batch, head, chunk).

  Args:
    k: [B, T, H, K]; v: [B, T, H, V]; a: the chunks' `(I + L)^-1` [B, T, H, C] (from
      `wy`); beta: [B, T, H]; gamma: [B, T, H] float32; dw: dW [B, T, H, K]; dvn: dVn
      [B, T, H, V]; dk: pass 2's part of dk [B, T, H, K].
    block: columns of K and V per step of the loops over them.

  Returns:
    `(dk, dv, dbeta, dgamma)`: dk and dv in k's and v's dtypes; dbeta and this pass's part
    of dgamma [B, T, H] float32.
  """
  b, t, h, d_k = k.shape
  d_v = v.shape[-1]
  rows = lambda d: pl.BlockSpec((None, chunk, None, d), lambda i, j, n: (i, n, j, 0))
  gates = pl.BlockSpec((None, chunk, None), lambda i, j, n: (i, n, j))
  inputs = {"k": (k, rows(d_k)), "v": (v, rows(d_v)), "a": (a, rows(chunk)),
            "beta": (beta, gates), "gamma": (gamma, gates), "dw": (dw, rows(d_k)),
            "dvn": (dvn, rows(d_v)), "dk_part": (dk, rows(d_k))}
  gate_grad = (jax.ShapeDtypeStruct((b, t, h), jnp.float32), gates)
  outputs = {"dk": (jax.ShapeDtypeStruct(k.shape, k.dtype), rows(d_k)),
             "dv": (jax.ShapeDtypeStruct(v.shape, v.dtype), rows(d_v)),
             "dbeta": gate_grad, "dgamma": gate_grad}
  kernel = functools.partial(_wy_grads_kernel, names=tuple(inputs) + tuple(outputs),
                             block=block,
                             precise=k.dtype == jnp.float32)
  return pl.pallas_call(
      kernel,
      out_shape=tuple(shape for shape, _ in outputs.values()),
      grid=(b, h, t // chunk),
      in_specs=[spec for _, spec in inputs.values()],
      out_specs=tuple(spec for _, spec in outputs.values()),
      compiler_params=compat.triton_params(_WY_GRAD_WARPS, 1),
      interpret=interpret,
      name="delta_rule_wy_grads",
  )(*(array for array, _ in inputs.values()))
