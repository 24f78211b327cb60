"""The (gated) delta rule and (gated) linear attention on TPUs: Pallas via Mosaic.

The same two passes as the GPU kernels (see `common`). Mosaic tiles the last two dimensions
of a block, so the kernels work on a heads-first [B, H, T, D] copy of the inputs (the gates
as [B, H, 1, T]) and transpose the results back. The state pass walks the chunks as the
last ("arbitrary") grid axis with the state in a VMEM scratch buffer; the backward's
`state_grad` walks them the same way in reverse, and `qk_grads` and `wy_grads` are
parallel like `wy`.

Checked in TPU interpret mode only: no TPU was at hand to compile it on.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from memjax.kernels import compat
from memjax.kernels.delta_rule import backward
from memjax.kernels.delta_rule import common

# Columns of K per program, and of K and V per loop step, of the backward's per-chunk passes:
# one 128-lane row.
BACKWARD_BLOCK = 128
# Columns of V per loop step of qk_grads, by the inputs' bytes per element: one lane row.
QK_GRADS_VALUE_BLOCK = {2: 128, 4: 128}
# Value columns per program of the forward and backward state passes (the latter by op: the
# "delta" rule or "linear" attention): one lane row, never narrower (`MIN_WALK_VALUE_BLOCK`),
# so the few-heads narrowing of `chunked.walk_value_block` does not apply.
STATE_VALUE_BLOCK = 128
STATE_GRAD_VALUE_BLOCK = {"delta": 128, "linear": 128}
MIN_WALK_VALUE_BLOCK = 128
MIN_WALK_PROGRAMS = 0


def _heads_first(x):
  """[B, T, H, D] -> [B, H, T, D]; gates [B, T, H] -> [B, H, 1, T]."""
  if x.ndim == 3:
    return jnp.moveaxis(x, 1, 2)[:, :, None, :]
  return jnp.moveaxis(x, 1, 2)


def _time_second(x):
  """[B, H, T, D] -> [B, T, H, D]."""
  return jnp.moveaxis(x, 2, 1)


def _wy_kernel(k_ref, v_ref, beta_ref, gamma_ref, w_ref, u_ref, *a_ref, chunk, precise):
  """k, w [C, K]; v, u [C, V]; a [C, C] (only when asked for): one chunk of one head;
  beta, gamma [1, T]: the whole head."""
  start = pl.program_id(2) * chunk
  tile = common.tile
  gate_tile = lambda i: pl.ds(start + i * common.SUB, common.SUB)
  common.wy_chunk(
      load_k=lambda i: k_ref[tile(i), :], load_v=lambda i: v_ref[tile(i), :],
      load_beta=lambda i: beta_ref[0, gate_tile(i)],
      load_gamma=lambda i: gamma_ref[0, gate_tile(i)],
      store_w=common.tile_writer(w_ref), store_u=common.tile_writer(u_ref), chunk=chunk,
      precise=precise, store_a=common.tile_writer(a_ref[0]) if a_ref else None)


def wy(k, v, beta, gamma, *, chunk, interpret, inverse=False):
  """W and U of every chunk, [B, T, H, K] and [B, T, H, V] in k's dtype (T % chunk == 0);
  with `inverse`, also every chunk's `(I + L)^-1` as [B, T, H, C] in k's dtype."""
  k, v, beta, gamma = map(_heads_first, (k, v, beta, gamma))
  b, h, t, dk = k.shape
  dv = v.shape[-1]
  rows = lambda d: pl.BlockSpec((None, None, chunk, d), lambda i, j, n: (i, j, n, 0))
  gates = pl.BlockSpec((None, None, 1, t), lambda i, j, n: (i, j, 0, 0))
  kernel = functools.partial(_wy_kernel, chunk=chunk, precise=k.dtype == jnp.float32)
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, k.dtype)]
  out_specs = [rows(dk), rows(dv)]
  if inverse:
    out_shape.append(jax.ShapeDtypeStruct((b, h, t, chunk), k.dtype))
    out_specs.append(rows(chunk))
  out = pl.pallas_call(
      kernel,
      out_shape=tuple(out_shape),
      grid=(b, h, t // chunk),
      in_specs=[rows(dk), rows(dv), gates, gates],
      out_specs=tuple(out_specs),
      compiler_params=compat.tpu_params(("parallel", "parallel", "parallel")),
      interpret=interpret,
      name="delta_rule_wy",
  )(k, v, beta, gamma)
  return tuple(map(_time_second, out))


def _state_kernel(*refs, chunk, scale, precise, delta, save_residuals):
  """q, k, w [C, K]; u, o [C, Vb]: one chunk; gamma [1, T]; state0, final, state [K, Vb];
  with `save_residuals`, starts [K, Vb] (this chunk's start state) and (delta rule)
  vn [C, Vb]."""
  refs = list(refs)
  state_ref = refs.pop()
  vn_ref = refs.pop() if save_residuals and delta else None
  starts_ref = refs.pop() if save_residuals else None
  if delta:
    q_ref, k_ref, u_ref, w_ref, gamma_ref, state0_ref, o_ref, final_ref = refs
  else:
    q_ref, k_ref, u_ref, gamma_ref, state0_ref, o_ref, final_ref = refs
    w_ref = None
  n = pl.program_id(3)

  @pl.when(n == 0)
  def _():
    state_ref[...] = state0_ref[...]

  if save_residuals:
    starts_ref[...] = state_ref[...].astype(starts_ref.dtype)
  start = n * chunk
  o, state, v_new = common.state_chunk(
      q_ref[...], k_ref[...], u_ref[...], w_ref[...] if delta else None,
      gamma_ref[0, pl.ds(start, chunk)], gamma_ref[0, start + chunk - 1], state_ref[...],
      scale, precise)
  o_ref[...] = o.astype(o_ref.dtype)
  if vn_ref is not None:
    vn_ref[...] = v_new.astype(vn_ref.dtype)
  state_ref[...] = state

  @pl.when(n == pl.num_programs(3) - 1)
  def _():
    final_ref[...] = state


def state(q, k, u, w, gamma, state0, *, chunk, value_block, scale, out_dtype, interpret,
          save_residuals=False):
  """Outputs [B, T, H, V] and final state [B, H, K, V] (float32) of the state pass, and,
  with `save_residuals`, every chunk's start state [B, H, N, K, V] and (delta rule)
  Vn [B, T, H, V], in q's dtype.

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
                             precise=q.dtype == jnp.float32, delta=delta,
                             save_residuals=save_residuals)
  inputs = [q, k, u] + ([_heads_first(w)] if delta else []) + [gamma, state0]
  in_specs = [keys, keys, values] + ([keys] if delta else []) + [gates, states]
  out_shape = [jax.ShapeDtypeStruct((b, h, t, dv), out_dtype),
               jax.ShapeDtypeStruct(state0.shape, jnp.float32)]
  out_specs = [values, states]
  if save_residuals:
    out_shape.append(jax.ShapeDtypeStruct((b, h, t // chunk, dk, dv), q.dtype))
    out_specs.append(_chunk_state(dk, value_block, lambda n: n))
    if delta:
      out_shape.append(jax.ShapeDtypeStruct((b, h, t, dv), q.dtype))
      out_specs.append(values)
  out = pl.pallas_call(
      kernel,
      out_shape=tuple(out_shape),
      grid=(b, h, dv // value_block, t // chunk),
      in_specs=in_specs,
      out_specs=tuple(out_specs),
      scratch_shapes=[pltpu.VMEM((dk, value_block), jnp.float32)],
      compiler_params=compat.tpu_params(("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="delta_rule_state" if delta else "linear_attention_state",
  )(*inputs)
  out = list(out)
  if save_residuals and delta:
    out[3] = _time_second(out[3])
  return (_time_second(out[0]),) + tuple(out[1:])


def _chunk_state(dk, value_block, chunk_of):
  """Block of one chunk's state [K, Vb] in [B, H, N, K, V] on a (b, h, value block, step)
  grid; `chunk_of(step)` is the chunk that grid step visits."""
  return pl.BlockSpec((None, None, None, dk, value_block),
                      lambda i, j, c, n: (i, j, chunk_of(n), 0, c))


def _state_grad_kernel(*refs, chunk, scale, precise, delta):
  """q, k, w [C, K]; do, dvn [C, Vb]: one chunk (visited last to first); gamma [1, T];
  dfinal, dstate0, dend, dstate [K, Vb]."""
  if delta:
    q_ref, k_ref, w_ref, *refs = refs
  else:
    (q_ref, k_ref, *refs), w_ref = refs, None
  do_ref, gamma_ref, dfinal_ref, dend_ref, dvn_ref, dstate0_ref, dstate_ref = refs
  step = pl.program_id(3)
  start = (pl.num_programs(3) - 1 - step) * chunk

  @pl.when(step == 0)
  def _():
    dstate_ref[...] = dfinal_ref[...]

  dend_ref[...] = dstate_ref[...].astype(dend_ref.dtype)
  dstate, dv_new = backward.state_grad_chunk(
      q_ref[...], k_ref[...], w_ref[...] if delta else None, do_ref[...],
      gamma_ref[0, pl.ds(start, chunk)], gamma_ref[0, start + chunk - 1], dstate_ref[...],
      scale, precise)
  dvn_ref[...] = dv_new.astype(dvn_ref.dtype)
  dstate_ref[...] = dstate

  @pl.when(step == pl.num_programs(3) - 1)
  def _():
    dstate0_ref[...] = dstate


def state_grad(q, k, w, do, gamma, dfinal, *, chunk, value_block, scale, interpret):
  """Backward state pass: `(dends [B, H, N, K, V], dvn [B, T, H, V], dstate0 [B, H, K, V])`,
  the first two in q's dtype, dstate0 float32.

  Arguments as in `memjax.kernels.delta_rule.gpu.state_grad`.
  """
  delta = w is not None
  q, k, do, gamma = map(_heads_first, (q, k, do, gamma))
  b, h, t, dk = q.shape
  dv = do.shape[-1]
  last = t // chunk - 1
  keys = pl.BlockSpec((None, None, chunk, dk), lambda i, j, c, n: (i, j, last - n, 0))
  values = pl.BlockSpec((None, None, chunk, value_block),
                        lambda i, j, c, n: (i, j, last - n, c))
  gates = pl.BlockSpec((None, None, 1, t), lambda i, j, c, n: (i, j, 0, 0))
  states = pl.BlockSpec((None, None, dk, value_block), lambda i, j, c, n: (i, j, 0, c))
  kernel = functools.partial(_state_grad_kernel, chunk=chunk, scale=scale,
                             precise=q.dtype == jnp.float32, delta=delta)
  inputs = [q, k] + ([_heads_first(w)] if delta else []) + [do, gamma,
                                                           dfinal.astype(jnp.float32)]
  in_specs = [keys, keys] + ([keys] if delta else []) + [values, gates, states]
  dends, dvn, dstate0 = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((b, h, t // chunk, dk, dv), q.dtype),
                 jax.ShapeDtypeStruct((b, h, t, dv), q.dtype),
                 jax.ShapeDtypeStruct(dfinal.shape, jnp.float32)),
      grid=(b, h, dv // value_block, t // chunk),
      in_specs=in_specs,
      out_specs=(_chunk_state(dk, value_block, lambda n: last - n), values, states),
      scratch_shapes=[pltpu.VMEM((dk, value_block), jnp.float32)],
      compiler_params=compat.tpu_params(("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="delta_rule_state_grad" if delta else "linear_attention_state_grad",
  )(*inputs)
  return dends, _time_second(dvn), dstate0


def _block_access(ref):
  """`load(name, cols)` and `store(name, value, cols)` over a dict of refs: the whole block
  when `cols` is None, else its column block `cols`; the gate cotangents are [1, C] rows."""
  def load(name, cols):
    return ref[name][...] if cols is None else ref[name][:, cols]

  def store(name, value, cols=None):
    if name in ("dbeta", "dgamma"):
      ref[name][0, :] = value
    elif cols is None:
      ref[name][...] = value.astype(ref[name].dtype)
    else:
      ref[name][:, cols] = value.astype(ref[name].dtype)
  return load, store


def _gate_grad(b, h, num_chunks, chunk, index_map, leading=()):
  """Shape and block of a gate cotangent as [*leading, B, H, N, 1, C] (a block's last two
  dims must be whole or tiled), one [1, C] row per program."""
  return (jax.ShapeDtypeStruct(leading + (b, h, num_chunks, 1, chunk), jnp.float32),
          pl.BlockSpec((None,) * len(leading) + (None, None, None, 1, chunk), index_map))


def _gates_out(x, b, h, t):
  """[..., B, H, N, 1, C] -> [..., B, T, H]."""
  return jnp.moveaxis(x.reshape(x.shape[:-5] + (b, h, t)), -2, -1)


def _qk_grads_kernel(*refs, names, chunk, value_block, scale, precise, delta):
  """Refs (named by `names`): q, k, w, dq, dk, dw [C, Kb]; do, vn, dvn [C, V]: one chunk
  of one head; gamma [1, T]: the whole head; state0, dstate1 [Kb, V]; dgamma [1, C]."""
  ref = dict(zip(names, refs))
  load, store = _block_access(ref)
  start = pl.program_id(3) * chunk
  backward.qk_grads_chunk(load, ref["gamma"][0, pl.ds(start, chunk)],
                          ref["gamma"][0, start + chunk - 1], store,
                          value_dim=ref["do"].shape[1], value_block=value_block,
                          scale=scale, precise=precise, delta=delta)


def qk_grads(q, k, w, do, vn, dvn, gamma, starts, dends, *, chunk, key_block, value_block,
             scale, interpret):
  """Backward pass 2: `(dq, dk, dw, dgamma)`, grid (batch, head, key block, chunk).

  Arguments and results as in `memjax.kernels.delta_rule.gpu.qk_grads`.
  """
  delta = w is not None
  b, t, h, dk = q.shape
  dv = do.shape[-1]
  num_chunks = t // chunk
  keys = pl.BlockSpec((None, None, chunk, key_block), lambda i, j, c, n: (i, j, n, c))
  rows = pl.BlockSpec((None, None, chunk, dv), lambda i, j, c, n: (i, j, n, 0))
  gates = pl.BlockSpec((None, None, 1, t), lambda i, j, c, n: (i, j, 0, 0))
  states = pl.BlockSpec((None, None, None, key_block, dv),
                        lambda i, j, c, n: (i, j, n, c, 0))
  inputs = {"q": (q, keys), "k": (k, keys), "do": (do, rows), "vn": (vn, rows),
            "dvn": (dvn, rows), "gamma": (gamma, gates), "state0": (starts, states),
            "dstate1": (dends, states)}
  if delta:
    inputs["w"] = (w, keys)
  f32 = lambda d: jax.ShapeDtypeStruct((b, h, t, d), jnp.float32)
  outputs = {"dq": (jax.ShapeDtypeStruct((b, h, t, dk), q.dtype), keys),
             "dk": (f32(dk), keys),
             "dgamma": _gate_grad(b, h, num_chunks, chunk,
                                  lambda i, j, c, n: (c, i, j, n, 0, 0), (dk // key_block,))}
  if delta:
    outputs["dw"] = (jax.ShapeDtypeStruct((b, h, t, dk), q.dtype), keys)
  kernel = functools.partial(
      _qk_grads_kernel, names=tuple(inputs) + tuple(outputs), chunk=chunk,
      value_block=value_block, scale=scale, precise=q.dtype == jnp.float32, delta=delta)
  arrays = [x if x.ndim == 5 else _heads_first(x) for x, _ in inputs.values()]
  grads = pl.pallas_call(
      kernel,
      out_shape=tuple(shape for shape, _ in outputs.values()),
      grid=(b, h, dk // key_block, num_chunks),
      in_specs=[spec for _, spec in inputs.values()],
      out_specs=tuple(spec for _, spec in outputs.values()),
      compiler_params=compat.tpu_params(("parallel",) * 4),
      interpret=interpret,
      name="delta_rule_qk_grads" if delta else "linear_attention_qk_grads",
  )(*arrays)
  grads = dict(zip(outputs, grads))
  dw = _time_second(grads["dw"]) if delta else None
  return (_time_second(grads["dq"]), _time_second(grads["dk"]), dw,
          _gates_out(grads["dgamma"], b, h, t))


def _wy_grads_kernel(*refs, names, chunk, block, precise):
  """Refs (named by `names`): k, dw, dk_part, dk [C, K]; a [C, C]; v, dvn, dv [C, V]: one
  chunk of one head; beta, gamma [1, T]: the whole head; dbeta, dgamma [1, C]."""
  ref = dict(zip(names, refs))
  load, store = _block_access(ref)
  rows = pl.ds(pl.program_id(2) * chunk, chunk)
  backward.wy_grads_chunk(load, ref["beta"][0, rows].astype(jnp.float32),
                          ref["gamma"][0, rows], store, key_dim=ref["k"].shape[1],
                          value_dim=ref["v"].shape[1], block=block, precise=precise)


def wy_grads(k, v, a, beta, gamma, dw, dvn, dk, *, chunk, block, interpret):
  """Backward pass 3: `(dk, dv, dbeta, dgamma)`, grid (batch, head, chunk).

  Arguments and results as in `memjax.kernels.delta_rule.gpu.wy_grads`.
  """
  b, t, h, d_k = k.shape
  d_v = v.shape[-1]
  num_chunks = t // chunk
  rows = lambda d: pl.BlockSpec((None, None, chunk, d), lambda i, j, n: (i, j, n, 0))
  gates = pl.BlockSpec((None, None, 1, t), lambda i, j, n: (i, j, 0, 0))
  inputs = {"k": (k, rows(d_k)), "v": (v, rows(d_v)), "a": (a, rows(chunk)),
            "beta": (beta, gates), "gamma": (gamma, gates), "dw": (dw, rows(d_k)),
            "dvn": (dvn, rows(d_v)), "dk_part": (dk, rows(d_k))}
  gate_grad = _gate_grad(b, h, num_chunks, chunk, lambda i, j, n: (i, j, n, 0, 0))
  outputs = {"dk": (jax.ShapeDtypeStruct((b, h, t, d_k), k.dtype), rows(d_k)),
             "dv": (jax.ShapeDtypeStruct((b, h, t, d_v), v.dtype), rows(d_v)),
             "dbeta": gate_grad, "dgamma": gate_grad}
  kernel = functools.partial(_wy_grads_kernel, names=tuple(inputs) + tuple(outputs),
                             chunk=chunk, block=block, precise=k.dtype == jnp.float32)
  grads = pl.pallas_call(
      kernel,
      out_shape=tuple(shape for shape, _ in outputs.values()),
      grid=(b, h, num_chunks),
      in_specs=[spec for _, spec in inputs.values()],
      out_specs=tuple(spec for _, spec in outputs.values()),
      compiler_params=compat.tpu_params(("parallel",) * 3),
      interpret=interpret,
      name="delta_rule_wy_grads",
  )(*(_heads_first(x) for x, _ in inputs.values()))
  dk, dv, dbeta, dgamma = grads
  return (_time_second(dk), _time_second(dv), _gates_out(dbeta, b, h, t),
          _gates_out(dgamma, b, h, t))
