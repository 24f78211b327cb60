"""The (gated) delta rule and (gated) linear attention on TPUs: Pallas via Mosaic.

The same two passes as the GPU kernels (see `common`). Mosaic tiles the last two dimensions
of a block, so the kernels work on a heads-first [B, H, T, D] copy of the inputs (the gates
as [B, H, 1, T]) and transpose the results back. The state pass walks the chunks as the
last ("arbitrary") grid axis with the state in a VMEM scratch buffer; the backward's
`state_grad` walks them the same way in reverse, and `chunk_grads` is parallel like `wy`.

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
  with `inverse`, also every chunk's `(I + L)^-1` as [B, T, H, C] float32."""
  k, v, beta, gamma = map(_heads_first, (k, v, beta, gamma))
  b, h, t, dk = k.shape
  dv = v.shape[-1]
  rows = lambda d: pl.BlockSpec((None, None, chunk, d), lambda i, j, n: (i, j, n, 0))
  gates = pl.BlockSpec((None, None, 1, t), lambda i, j, n: (i, j, 0, 0))
  kernel = functools.partial(_wy_kernel, chunk=chunk, precise=k.dtype == jnp.float32)
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, k.dtype)]
  out_specs = [rows(dk), rows(dv)]
  if inverse:
    out_shape.append(jax.ShapeDtypeStruct((b, h, t, chunk), jnp.float32))
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


def _state_kernel(*refs, chunk, scale, precise, delta, save_starts):
  """q, k, w [C, K]; u, o [C, Vb]: one chunk; gamma [1, T]; state0, final, state [K, Vb];
  starts [K, Vb]: this chunk's start state, when `save_starts`."""
  refs = list(refs)
  state_ref = refs.pop()
  starts_ref = refs.pop() if save_starts else None
  if delta:
    q_ref, k_ref, u_ref, w_ref, gamma_ref, state0_ref, o_ref, final_ref = refs
  else:
    q_ref, k_ref, u_ref, gamma_ref, state0_ref, o_ref, final_ref = refs
    w_ref = None
  n = pl.program_id(3)

  @pl.when(n == 0)
  def _():
    state_ref[...] = state0_ref[...]

  if save_starts:
    starts_ref[...] = state_ref[...]
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


def state(q, k, u, w, gamma, state0, *, chunk, value_block, scale, out_dtype, interpret,
          save_starts=False):
  """Outputs [B, T, H, V] and final state [B, H, K, V] (float32) of the state pass, and,
  if `save_starts`, every chunk's start state [B, H, N, K, V] float32.

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
                             save_starts=save_starts)
  inputs = [q, k, u] + ([_heads_first(w)] if delta else []) + [gamma, state0]
  in_specs = [keys, keys, values] + ([keys] if delta else []) + [gates, states]
  out_shape = [jax.ShapeDtypeStruct((b, h, t, dv), out_dtype),
               jax.ShapeDtypeStruct(state0.shape, jnp.float32)]
  out_specs = [values, states]
  if save_starts:
    out_shape.append(jax.ShapeDtypeStruct((b, h, t // chunk, dk, dv), jnp.float32))
    out_specs.append(_chunk_state(dk, value_block, lambda n: n))
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

  dend_ref[...] = dstate_ref[...]
  dstate, dv_new = backward.state_grad_chunk(
      q_ref[...], k_ref[...], w_ref[...] if delta else None, do_ref[...],
      gamma_ref[0, pl.ds(start, chunk)], gamma_ref[0, start + chunk - 1], dstate_ref[...],
      scale, precise)
  dvn_ref[...] = dv_new
  dstate_ref[...] = dstate

  @pl.when(step == pl.num_programs(3) - 1)
  def _():
    dstate0_ref[...] = dstate


def state_grad(q, k, w, do, gamma, dfinal, *, chunk, value_block, scale, interpret):
  """Backward state pass: `(dends [B, H, N, K, V], dvn [B, T, H, V], dstate0 [B, H, K, V])`,
  float32.

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
      out_shape=(jax.ShapeDtypeStruct((b, h, t // chunk, dk, dv), jnp.float32),
                 jax.ShapeDtypeStruct((b, h, t, dv), jnp.float32),
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


def _chunk_grads_kernel(*refs, names, chunk, value_block, scale, precise, delta):
  """Refs (named by `names`): q, k, w, dq, dk [C, K]; a [C, C]; v, u, do, dvn, dv [C, V]:
  one chunk of one head; beta, gamma [1, T]: the whole head; state0, dstate1 [K, V];
  dbeta, dgamma [1, C]: the chunk."""
  ref = dict(zip(names, refs))
  start = pl.program_id(2) * chunk

  def load(name, cols):
    return ref[name][...] if cols is None else ref[name][:, cols]

  def store(name, value, cols):
    if name in ("dbeta", "dgamma"):
      ref[name][0, :] = value
    elif cols is None:
      ref[name][...] = value.astype(ref[name].dtype)
    else:
      ref[name][:, cols] = value.astype(ref[name].dtype)

  backward.chunk_grads(load, lambda name: ref[name][0, pl.ds(start, chunk)], store,
                       gamma_last=ref["gamma"][0, start + chunk - 1],
                       value_dim=ref["v"].shape[1], value_block=value_block, scale=scale,
                       precise=precise, delta=delta)


def chunk_grads(q, k, v, w, u, a, do, dvn, beta, gamma, starts, dends, *, chunk, value_block,
                scale, interpret):
  """Backward chunk pass: `(dq, dk, dv, dbeta, dgamma)`.

  Arguments and results as in `memjax.kernels.delta_rule.gpu.chunk_grads`.
  """
  delta = w is not None
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  num_chunks = t // chunk
  rows = lambda d: pl.BlockSpec((None, None, chunk, d), lambda i, j, n: (i, j, n, 0))
  gates = pl.BlockSpec((None, None, 1, t), lambda i, j, n: (i, j, 0, 0))
  states = pl.BlockSpec((None, None, None, dk, dv), lambda i, j, n: (i, j, n, 0, 0))
  inputs = {"q": (q, rows(dk)), "k": (k, rows(dk)), "v": (v, rows(dv)),
            "do": (do, rows(dv)), "dvn": (dvn, rows(dv)), "gamma": (gamma, gates),
            "state0": (starts, states), "dstate1": (dends, states)}
  if delta:
    inputs.update(w=(w, rows(dk)), u=(u, rows(dv)), a=(a, rows(chunk)), beta=(beta, gates))
  # Gate cotangents as [B, H, N, 1, C]: a block's last two dims must be whole or tiled.
  gate_grad = (jax.ShapeDtypeStruct((b, h, num_chunks, 1, chunk), jnp.float32),
               pl.BlockSpec((None, None, None, 1, chunk), lambda i, j, n: (i, j, n, 0, 0)))
  outputs = {"dq": (jax.ShapeDtypeStruct((b, h, t, dk), q.dtype), rows(dk)),
             "dk": (jax.ShapeDtypeStruct((b, h, t, dk), k.dtype), rows(dk)),
             "dgamma": gate_grad}
  if delta:
    outputs.update(dv=(jax.ShapeDtypeStruct((b, h, t, dv), v.dtype), rows(dv)),
                   dbeta=gate_grad)
  kernel = functools.partial(
      _chunk_grads_kernel, names=tuple(inputs) + tuple(outputs), chunk=chunk,
      value_block=value_block, scale=scale, precise=q.dtype == jnp.float32, delta=delta)
  arrays = [x if x.ndim == 5 else _heads_first(x) for x, _ in inputs.values()]
  grads = pl.pallas_call(
      kernel,
      out_shape=tuple(shape for shape, _ in outputs.values()),
      grid=(b, h, num_chunks),
      in_specs=[spec for _, spec in inputs.values()],
      out_specs=tuple(spec for _, spec in outputs.values()),
      compiler_params=compat.tpu_params(("parallel", "parallel", "parallel")),
      interpret=interpret,
      name="delta_rule_chunk_grads" if delta else "linear_attention_chunk_grads",
  )(*arrays)
  grads = dict(zip(outputs, grads))
  # [B, H, N, 1, C] -> [B, T, H].
  gate_out = lambda x: None if x is None else jnp.moveaxis(x.reshape(b, h, t), 1, 2)
  dv_out = _time_second(grads["dv"]) if delta else dvn.astype(v.dtype)
  return (_time_second(grads["dq"]), _time_second(grads["dk"]), dv_out,
          gate_out(grads.get("dbeta")), gate_out(grads["dgamma"]))
