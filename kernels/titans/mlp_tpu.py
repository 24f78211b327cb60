"""The MLP memory's chunk loop on TPUs: Pallas via Mosaic.

The grid is (batch, head, chunk) with the chunks as the last ("arbitrary") axis; W and S
of every layer (or, in the backward, which visits the chunks in reverse, their
cotangents) live in VMEM scratch buffers across it. The per-chunk math is
`mlp_common`'s; gate vectors travel as [1, C] rows as in `memjax.kernels.titans.tpu`.

Checked in TPU interpret mode and by lowering to Mosaic on the CPU only: no TPU was at
hand to compile it on.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from memjax.kernels import compat
from memjax.kernels.titans import mlp_common
from memjax.kernels.titans.tpu import as_rows, last_real_chunk

_VECTORS = ("d", "b", "cs", "e")


def _chunk_values(r):
  """`mlp_common.CHUNK_INPUTS` of the chunk whose blocks the refs hold."""
  x = {name: r[name][...] for name in ("q", "k", "v", "cw")}
  x.update({name: r[name][0, :] for name in _VECTORS})
  return x


def _specs(dk, chunk, num_chunks, chunk_of):
  """BlockSpecs on the (batch i, head j, step n) grid; `chunk_of(n)` is the chunk that
  step n visits."""
  return dict(
      rows=lambda width: pl.BlockSpec((None, None, chunk, width),
                                      lambda i, j, n: (i, j, chunk_of(n), 0)),
      gates=pl.BlockSpec((None, None, None, 1, chunk), lambda i, j, n: (i, j, chunk_of(n), 0, 0)),
      last_gates=pl.BlockSpec((None, None, None, 1, chunk),
                              lambda i, j, n: (i, j, num_chunks - 1, 0, 0)),
      layer=lambda shape: pl.BlockSpec((None, None) + shape, lambda i, j, n: (i, j, 0, 0)),
      start=lambda shape: pl.BlockSpec((None, None, None) + shape,
                                       lambda i, j, n: (i, j, chunk_of(n), 0, 0)),
  )


def _input_specs(spec, dk, chunk):
  return ([spec["rows"](dk)] * 3 + [spec["rows"](chunk)] + [spec["gates"]] * 4
          + [spec["last_gates"]])


def _inputs(q, k, v, coefficients, chunk):
  return [q, k, v, coefficients["cw"]] + [as_rows(coefficients[n], chunk)
                                          for n in _VECTORS + ("mask",)]


_INPUTS = ("q", "k", "v", "cw") + _VECTORS + ("mask",)


def _forward_kernel(*refs, depth, activation, precise, save_starts):
  """Refs: one chunk's q, k, v [C, K], cw [C, C], d, b, cs, e [1, C]; the last chunk's mask
  [1, C]; weights0, momentum0, anchor0 per layer [d_in, d_out]; outputs y [C, K], weights,
  momentum, last_anchor per layer and, with `save_starts`, this chunk's start W and S per
  layer; scratch W and S per layer."""
  names = (_INPUTS + mlp_common.layer_names(depth, "w0_", "s0_", "a0_") + ("y",)
           + mlp_common.layer_names(depth, "w_", "s_", "last_a_")
           + (mlp_common.layer_names(depth, "ws_", "ss_") if save_starts else ())
           + mlp_common.layer_names(depth, "w_now_", "s_now_"))
  r = dict(zip(names, refs))
  n = pl.program_id(2)

  @pl.when(n == 0)
  def _():
    for i in range(depth):
      r[f"w_now_{i}"][...] = r[f"w0_{i}"][...]
      r[f"s_now_{i}"][...] = r[f"s0_{i}"][...]

  weights = tuple(r[f"w_now_{i}"][...] for i in range(depth))
  momentum = tuple(r[f"s_now_{i}"][...] for i in range(depth))
  # Only a first chunk entered part way takes its gradients at other weights than W0.
  anchor = tuple(jnp.where(n == 0, r[f"a0_{i}"][...], w) for i, w in enumerate(weights))
  if save_starts:
    for i in range(depth):
      r[f"ws_{i}"][...] = weights[i]
      r[f"ss_{i}"][...] = momentum[i]
  y, weights, momentum = mlp_common.forward_chunk(_chunk_values(r), weights, momentum, anchor,
                                                  activation, precise)
  r["y"][...] = y.astype(r["y"].dtype)
  for i in range(depth):
    r[f"w_now_{i}"][...] = weights[i]
    r[f"s_now_{i}"][...] = momentum[i]

  @pl.when(n == last_real_chunk(r["mask"], 2))
  def _():
    for i in range(depth):
      r[f"last_a_{i}"][...] = anchor[i]

  @pl.when(n == pl.num_programs(2) - 1)
  def _():
    for i in range(depth):
      r[f"w_{i}"][...] = weights[i]
      r[f"s_{i}"][...] = momentum[i]


def forward(q, k, v, coefficients, weights0, momentum0, anchor0, *, chunk, activation,
            interpret, save_starts=False):
  """The MLP memory's chunk loop forward; arguments and results as in
  `memjax.kernels.titans.mlp_gpu.forward`."""
  b, h, t, dk = q.shape
  depth = len(weights0)
  num_chunks = t // chunk
  shapes = [w.shape[2:] for w in weights0]
  spec = _specs(dk, chunk, num_chunks, lambda n: n)
  layer_specs = [spec["layer"](s) for s in shapes]
  states = [jax.ShapeDtypeStruct(w.shape, jnp.float32) for w in weights0]
  out_shape = [jax.ShapeDtypeStruct(v.shape, v.dtype)] + states * 3
  out_specs = [spec["rows"](dk)] + layer_specs * 3
  if save_starts:
    out_shape += [jax.ShapeDtypeStruct((b, h, num_chunks) + s, jnp.float32)
                  for s in shapes] * 2
    out_specs += [spec["start"](s) for s in shapes] * 2
  kernel = functools.partial(_forward_kernel, depth=depth, activation=activation,
                             precise=q.dtype == jnp.float32, save_starts=save_starts)
  out = pl.pallas_call(
      kernel,
      out_shape=tuple(out_shape),
      grid=(b, h, num_chunks),
      in_specs=_input_specs(spec, dk, chunk) + layer_specs * 3,
      out_specs=tuple(out_specs),
      scratch_shapes=[pltpu.VMEM(s, jnp.float32) for s in shapes] * 2,
      compiler_params=compat.tpu_params(("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="mlp_memory_forward",
  )(*_inputs(q, k, v, coefficients, chunk), *weights0, *momentum0, *anchor0)
  return (out[0],) + mlp_common.by_layer(out[1:], depth)


def _backward_kernel(*refs, depth, activation, precise):
  """Refs: the forward's inputs for one chunk (visited last to first), anchor0 per layer;
  the chunk's start W and S per layer; dy [C, K]; dweights, dmomentum, dlast_anchor per
  layer; outputs dq, dk, dv [C, K], dcw [C, C], dd, db, dcs, de [1, C], dweights0,
  dmomentum0, danchor0 per layer; scratch dW and dS per layer."""
  names = (_INPUTS + mlp_common.layer_names(depth, "a0_", "ws_", "ss_") + ("dy",)
           + mlp_common.layer_names(depth, "dw_", "ds_", "dla_") + mlp_common.GRADS
           + mlp_common.layer_names(depth, "dw0_", "ds0_", "da0_", "dw_now_", "ds_now_"))
  r = dict(zip(names, refs))
  step = pl.program_id(2)
  n = pl.num_programs(2) - 1 - step

  @pl.when(step == 0)
  def _():
    for i in range(depth):
      r[f"dw_now_{i}"][...] = r[f"dw_{i}"][...]
      r[f"ds_now_{i}"][...] = r[f"ds_{i}"][...]

  weights = tuple(r[f"ws_{i}"][...] for i in range(depth))
  momentum = tuple(r[f"ss_{i}"][...] for i in range(depth))
  anchor = tuple(jnp.where(n == 0, r[f"a0_{i}"][...], w) for i, w in enumerate(weights))
  dx, dweights, dmomentum, danchor = mlp_common.backward_chunk(
      _chunk_values(r), weights, momentum, anchor, r["dy"][...],
      tuple(r[f"dw_now_{i}"][...] for i in range(depth)),
      tuple(r[f"ds_now_{i}"][...] for i in range(depth)), activation, precise)
  for name in ("q", "k", "v", "cw"):
    r["d" + name][...] = dx[name].astype(r["d" + name].dtype)
  for name in _VECTORS:
    r["d" + name][0, :] = dx[name]
  last_real = last_real_chunk(r["mask"], 2)
  for i in range(depth):
    # The last real chunk's anchor is also an output (the state's anchor if it is partial).
    da = danchor[i] + jnp.where(n == last_real, r[f"dla_{i}"][...], 0.0)
    dw = dweights[i] + jnp.where(n > 0, da, 0.0)
    r[f"dw_now_{i}"][...] = dw
    r[f"ds_now_{i}"][...] = dmomentum[i]

    @pl.when(n == 0)
    def _():
      r[f"da0_{i}"][...] = da
      r[f"dw0_{i}"][...] = dw
      r[f"ds0_{i}"][...] = dmomentum[i]


def backward(q, k, v, coefficients, anchor0, weight_starts, momentum_starts, dy, dweights,
             dmomentum, dlast_anchor, *, chunk, activation, interpret):
  """The MLP memory's chunk loop backward; arguments and results as in
  `memjax.kernels.titans.mlp_gpu.backward`."""
  b, h, t, dk = q.shape
  depth = len(anchor0)
  num_chunks = t // chunk
  shapes = [a.shape[2:] for a in anchor0]
  spec = _specs(dk, chunk, num_chunks, lambda n: num_chunks - 1 - n)
  layer_specs = [spec["layer"](s) for s in shapes]
  start_specs = [spec["start"](s) for s in shapes]
  f32 = jnp.float32
  states = [jax.ShapeDtypeStruct(a.shape, f32) for a in anchor0]
  vectors = jax.ShapeDtypeStruct((b, h, num_chunks, 1, chunk), f32)
  out = pl.pallas_call(
      functools.partial(_backward_kernel, depth=depth, activation=activation,
                        precise=q.dtype == f32),
      out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype),
                 jax.ShapeDtypeStruct((b, h, t, chunk), f32))
      + (vectors,) * 4 + tuple(states) * 3,
      grid=(b, h, num_chunks),
      in_specs=(_input_specs(spec, dk, chunk) + layer_specs + start_specs * 2
                + [spec["rows"](dk)] + layer_specs * 3),
      out_specs=(spec["rows"](dk),) * 3 + (spec["rows"](chunk),) + (spec["gates"],) * 4
      + tuple(layer_specs) * 3,
      scratch_shapes=[pltpu.VMEM(s, f32) for s in shapes] * 2,
      compiler_params=compat.tpu_params(("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="mlp_memory_backward",
  )(*_inputs(q, k, v, coefficients, chunk), *anchor0, *weight_starts, *momentum_starts, dy,
    *dweights, *dmomentum, *dlast_anchor)
  grads = mlp_common.backward_grads(out, depth)
  for name in ("dd", "db", "dcs", "de"):
    grads[name] = grads[name].reshape(b, h, t)
  return grads
