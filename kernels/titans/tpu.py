"""The neural-memory chunk loop on TPUs: Pallas via Mosaic.

The same passes as the GPU kernels (see `common`): the chunk walks have the chunks as the
last ("arbitrary") grid axis and the memory's W and S (or their cotangents) in VMEM
scratch buffers across it; the backward's per-chunk pass is parallel. Mosaic tiles the
last two dimensions of a block, so each chunk's gate vectors travel as [1, C] rows of a
[B, H, N, 1, C] copy.

Checked in TPU interpret mode only: no TPU was at hand to compile it on.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from memjax.kernels import compat
from memjax.kernels.titans import common

_VECTORS = ("d", "b", "cs", "e")
# mask comes as the last chunk's row only: it says whether the last chunk holds a token.
_INPUTS = ("q", "k", "v", "cw") + _VECTORS + ("mask",)


def _chunk_values(r):
  """The values `common.forward_chunk` reads, from one chunk's blocks."""
  x = {name: r[name][...] for name in ("q", "k", "v", "cw")}
  x.update({name: r[name][0, :] for name in ("d", "b", "cs")})
  last = r["q"].shape[0] - 1
  x.update(cw_last=r["cw"][last, :], d_last=r["d"][0, last], b_last=r["b"][0, last],
           e_last=r["e"][0, last])
  return x


def as_rows(x, chunk):
  """Gate vectors [..., T] -> [..., N, 1, C]."""
  return x.reshape(x.shape[:-1] + (x.shape[-1] // chunk, 1, chunk))


def _specs(dk, chunk, value_block, num_chunks, chunk_of):
  """BlockSpecs on the (batch i, head j, value block c, step n) grid; `chunk_of(n)` is the
  chunk that step n visits."""
  return dict(
      last_gates=pl.BlockSpec((None, None, None, 1, chunk),
                              lambda i, j, c, n: (i, j, num_chunks - 1, 0, 0)),
      keys=pl.BlockSpec((None, None, chunk, dk), lambda i, j, c, n: (i, j, chunk_of(n), 0)),
      values=pl.BlockSpec((None, None, chunk, value_block),
                          lambda i, j, c, n: (i, j, chunk_of(n), c)),
      cw=pl.BlockSpec((None, None, chunk, chunk), lambda i, j, c, n: (i, j, chunk_of(n), 0)),
      gates=pl.BlockSpec((None, None, None, 1, chunk),
                         lambda i, j, c, n: (i, j, chunk_of(n), 0, 0)),
      states=pl.BlockSpec((None, None, dk, value_block), lambda i, j, c, n: (i, j, 0, c)),
      starts=pl.BlockSpec((None, None, None, dk, value_block),
                          lambda i, j, c, n: (i, j, chunk_of(n), 0, c)),
  )


def _input_specs(spec):
  return ([spec["keys"], spec["keys"], spec["values"], spec["cw"]] + [spec["gates"]] * 4
          + [spec["last_gates"]])


def _inputs(q, k, v, coefficients, chunk):
  return [q, k, v, coefficients["cw"]] + [as_rows(coefficients[n], chunk)
                                          for n in _VECTORS + ("mask",)]


def last_real_chunk(mask_ref, chunk_axis):
  """The last chunk that holds a token (see `memjax.kernels.titans.gpu`), from the last
  chunk's mask row and the grid axis that walks the chunks."""
  empty = jnp.max(mask_ref[...]) == 0.0
  return pl.num_programs(chunk_axis) - 1 - empty.astype(jnp.int32)


def _forward_kernel(*refs, precise, save_starts):
  """Refs: one chunk's q, k [C, K], v [C, Vb], cw [C, C], d, b, cs, e [1, C]; the last
  chunk's mask [1, C]; weights0,
  momentum0, anchor0 [K, Vb]; outputs y [C, Vb], weights, momentum, last_anchor [K, Vb]
  and, with `save_starts`, this chunk's start W and S [K, Vb]; scratch W, S [K, Vb]."""
  names = (_INPUTS + ("weights0", "momentum0", "anchor0", "y", "weights", "momentum",
                      "last_anchor")
           + (("weight_start", "momentum_start") if save_starts else ())
           + ("weights_now", "momentum_now"))
  r = dict(zip(names, refs))
  n = pl.program_id(3)
  last = pl.num_programs(3) - 1

  @pl.when(n == 0)
  def _():
    r["weights_now"][...] = r["weights0"][...]
    r["momentum_now"][...] = r["momentum0"][...]

  weights, momentum = r["weights_now"][...], r["momentum_now"][...]
  anchor = jnp.where(n == 0, r["anchor0"][...], weights)
  if save_starts:
    r["weight_start"][...] = weights
    r["momentum_start"][...] = momentum
  y, weights, momentum = common.forward_chunk(_chunk_values(r), weights, momentum, anchor,
                                              precise)
  r["y"][...] = y.astype(r["y"].dtype)
  r["weights_now"][...] = weights
  r["momentum_now"][...] = momentum

  @pl.when(n == last_real_chunk(r["mask"], 3))
  def _():
    r["last_anchor"][...] = anchor

  @pl.when(n == last)
  def _():
    r["weights"][...] = weights
    r["momentum"][...] = momentum


def forward(q, k, v, coefficients, weights0, momentum0, anchor0, *, chunk, value_block,
            interpret, save_starts=False):
  """The chunk loop forward; arguments and results as in
  `memjax.kernels.titans.gpu.forward`."""
  b, h, t, dk = q.shape
  dv = v.shape[-1]
  spec = _specs(dk, chunk, value_block, t // chunk, lambda n: n)
  state = jax.ShapeDtypeStruct((b, h, dk, dv), jnp.float32)
  out_shape = [jax.ShapeDtypeStruct(v.shape, v.dtype), state, state, state]
  out_specs = [spec["values"]] + [spec["states"]] * 3
  if save_starts:
    out_shape += [jax.ShapeDtypeStruct((b, h, t // chunk, dk, dv), jnp.float32)] * 2
    out_specs += [spec["starts"]] * 2
  kernel = functools.partial(_forward_kernel, precise=q.dtype == jnp.float32,
                             save_starts=save_starts)
  return pl.pallas_call(
      kernel,
      out_shape=tuple(out_shape),
      grid=(b, h, dv // value_block, t // chunk),
      in_specs=_input_specs(spec) + [spec["states"]] * 3,
      out_specs=tuple(out_specs),
      scratch_shapes=[pltpu.VMEM((dk, value_block), jnp.float32)] * 2,
      compiler_params=compat.tpu_params(("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="neural_memory_forward",
  )(*_inputs(q, k, v, coefficients, chunk), weights0, momentum0, anchor0)


def _state_grad_kernel(*refs, precise):
  """Refs: the forward's inputs for one chunk (visited last to first), anchor0; the
  chunk's start W and S [K, Vb]; dy [C, Vb]; dweights, dmomentum, dlast_anchor [K, Vb];
  outputs dv, derr [C, Vb], the chunk's end cotangents dW1, dS1 [K, Vb], dweights0,
  dmomentum0, danchor0 [K, Vb]; scratch dW, dS [K, Vb]."""
  names = _INPUTS + ("anchor0", "weight_start", "momentum_start", "dy", "dweights",
                     "dmomentum", "dlast_anchor", "dv", "derr", "dweight_end",
                     "dmomentum_end", "dweights0", "dmomentum0", "danchor0", "dweights_now",
                     "dmomentum_now")
  r = dict(zip(names, refs))
  step = pl.program_id(3)
  n = pl.num_programs(3) - 1 - step

  @pl.when(step == 0)
  def _():
    r["dweights_now"][...] = r["dweights"][...]
    r["dmomentum_now"][...] = r["dmomentum"][...]

  r["dweight_end"][...] = r["dweights_now"][...]
  r["dmomentum_end"][...] = r["dmomentum_now"][...]
  weights = r["weight_start"][...]
  anchor = jnp.where(n == 0, r["anchor0"][...], weights)
  derr, danchor, dweights, dmomentum = common.state_grad_chunk(
      _chunk_values(r), weights, r["momentum_start"][...], anchor, r["dy"][...],
      r["dweights_now"][...], r["dmomentum_now"][...], precise)
  # The last real chunk's anchor is also an output (the state's anchor if it is partial).
  last_real = last_real_chunk(r["mask"], 3)
  danchor = danchor + jnp.where(n == last_real, r["dlast_anchor"][...], 0.0)
  r["derr"][...] = derr
  r["dv"][...] = (-2.0 * derr).astype(r["dv"].dtype)
  dweights = dweights + jnp.where(n > 0, danchor, 0.0)
  r["dweights_now"][...] = dweights
  r["dmomentum_now"][...] = dmomentum

  @pl.when(n == 0)
  def _():
    r["danchor0"][...] = danchor
    r["dweights0"][...] = dweights
    r["dmomentum0"][...] = dmomentum


_INPUT_GRADS = ("dq", "dk", "dcw", "dd", "db", "dcs", "de")


def _input_grads_kernel(*refs, value_block, precise):
  """Refs: one chunk's q, k [C, K], v [C, V], cw [C, C], d, b, cs [1, C]; anchor0 [K, V];
  the chunk's start W, S and end cotangents dW1, dS1 [K, V]; dy, derr [C, V]; outputs dq,
  dk [C, K], dcw [C, C], dd, db, dcs, de [1, C]."""
  names = ("q", "k", "v", "cw", "d", "b", "cs", "anchor0", "weights", "momentum",
           "dweights", "dmomentum", "dy", "derr") + _INPUT_GRADS
  r = dict(zip(names, refs))
  chunk = r["q"].shape[0]
  first = pl.program_id(2) == 0

  def load(name, cols):
    if name == "anchor":
      return jnp.where(first, r["anchor0"][:, cols], r["weights"][:, cols])
    return r[name][:, cols]

  x = {name: r[name][...] for name in ("q", "k", "cw")}
  x.update({name: r[name][0, :] for name in ("d", "b", "cs")})
  x["cw_last"] = r["cw"][chunk - 1, :]
  grads = common.input_grads_chunk(load, x, r["v"].shape[1], value_block, precise)
  for name in _INPUT_GRADS:
    if name in ("dd", "db", "dcs", "de"):
      r[name][0, :] = grads[name]
    else:
      r[name][...] = grads[name]


def backward(q, k, v, coefficients, anchor0, weight_starts, momentum_starts, dy, dweights,
             dmomentum, dlast_anchor, *, chunk, value_block, interpret):
  """The chunk loop backward; arguments and results as in
  `memjax.kernels.titans.gpu.backward`."""
  b, h, t, dk = q.shape
  dv = v.shape[-1]
  num_chunks = t // chunk
  spec = _specs(dk, chunk, value_block, num_chunks, lambda n: num_chunks - 1 - n)
  f32 = jnp.float32
  state = jax.ShapeDtypeStruct((b, h, dk, dv), f32)
  ends = jax.ShapeDtypeStruct((b, h, num_chunks, dk, dv), f32)
  dv_out, derr, dweight_ends, dmomentum_ends, dweights0, dmomentum0, danchor0 = pl.pallas_call(
      functools.partial(_state_grad_kernel, precise=q.dtype == f32),
      out_shape=(jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct(v.shape, f32),
                 ends, ends, state, state, state),
      grid=(b, h, dv // value_block, num_chunks),
      in_specs=(_input_specs(spec) + [spec["states"], spec["starts"], spec["starts"],
                                      spec["values"]] + [spec["states"]] * 3),
      out_specs=(spec["values"], spec["values"], spec["starts"], spec["starts"])
      + (spec["states"],) * 3,
      scratch_shapes=[pltpu.VMEM((dk, value_block), f32)] * 2,
      compiler_params=compat.tpu_params(("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="neural_memory_state_grad",
  )(*_inputs(q, k, v, coefficients, chunk), anchor0, weight_starts, momentum_starts, dy,
    dweights, dmomentum, dlast_anchor)

  rows = lambda d: pl.BlockSpec((None, None, chunk, d), lambda i, j, n: (i, j, n, 0))
  gates = pl.BlockSpec((None, None, None, 1, chunk), lambda i, j, n: (i, j, n, 0, 0))
  whole = pl.BlockSpec((None, None, dk, dv), lambda i, j, n: (i, j, 0, 0))
  per_chunk = pl.BlockSpec((None, None, None, dk, dv), lambda i, j, n: (i, j, n, 0, 0))
  vectors = jax.ShapeDtypeStruct((b, h, num_chunks, 1, chunk), f32)
  out = pl.pallas_call(
      functools.partial(_input_grads_kernel, value_block=min(value_block, dv),
                        precise=q.dtype == f32),
      out_shape=(jax.ShapeDtypeStruct(q.shape, f32),) * 2
      + (jax.ShapeDtypeStruct((b, h, t, chunk), f32),) + (vectors,) * 4,
      grid=(b, h, num_chunks),
      in_specs=[rows(dk), rows(dk), rows(dv), rows(chunk), gates, gates, gates, whole]
      + [per_chunk] * 4 + [rows(dv)] * 2,
      out_specs=(rows(dk), rows(dk), rows(chunk)) + (gates,) * 4,
      compiler_params=compat.tpu_params(("parallel",) * 3),
      interpret=interpret,
      name="neural_memory_input_grads",
  )(q, k, v, coefficients["cw"], *(as_rows(coefficients[n], chunk) for n in ("d", "b", "cs")),
    anchor0, weight_starts, momentum_starts, dweight_ends, dmomentum_ends, dy, derr)
  grads = dict(zip(_INPUT_GRADS, out))
  for name in ("dd", "db", "dcs", "de"):
    grads[name] = grads[name].reshape(b, h, t)
  grads.update(dv=dv_out, dweights0=dweights0, dmomentum0=dmomentum0, danchor0=danchor0)
  return grads
