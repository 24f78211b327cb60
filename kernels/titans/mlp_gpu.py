"""The MLP memory's chunk loop on NVIDIA GPUs: Pallas via Triton.

One program per (batch, head) walks the chunks in order with W and S of every layer on
chip (`forward`), or in reverse with their cotangents (`backward`), the per-chunk math in
`mlp_common`. Arrays are heads first, [B, H, T, D], as in `memjax.kernels.titans.gpu`.
The state of one head is large for registers (see `mlp_common`): on an H100 this body
compiled only for small states (`mlp_common.GPU_STATE_LIMIT`) and ran slower than the
xla form, so `implementation=None` does not choose it.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from memjax.kernels import compat
from memjax.kernels.delta_rule import common as dcommon
from memjax.kernels.titans import mlp_common
from memjax.kernels.titans.gpu import COEFFICIENTS, last_real_chunk

_WARPS = 8
_STAGES = 1


def _chunk_values(r, n, chunk):
  """`mlp_common.CHUNK_INPUTS` of chunk n, from one head's whole-sequence refs."""
  rows = pl.ds(n * chunk, chunk)
  x = {name: r[name][rows, :] for name in ("q", "k", "v", "cw")}
  x.update({name: r[name][rows] for name in ("d", "b", "cs", "e")})
  return x


def _forward_kernel(*refs, depth, chunk, activation, precise, save_starts):
  """Refs: q, k, v [T, K]; cw [T, C]; d, b, cs, e, mask [T]; weights0, momentum0, anchor0
  per layer [d_in, d_out]; outputs y [T, K]; weights, momentum, last_anchor per layer and,
  with `save_starts`, every chunk's start W and S per layer [N, d_in, d_out]."""
  names = (("q", "k", "v") + COEFFICIENTS
           + mlp_common.layer_names(depth, "w0_", "s0_", "a0_") + ("y",)
           + mlp_common.layer_names(depth, "w_", "s_", "last_a_")
           + (mlp_common.layer_names(depth, "ws_", "ss_") if save_starts else ()))
  r = dict(zip(names, refs))
  num_chunks = r["q"].shape[0] // chunk
  last_real = last_real_chunk(r["mask"], num_chunks, chunk)
  anchor0 = tuple(r[f"a0_{i}"][...] for i in range(depth))

  def step(n, carry):
    weights, momentum = carry
    # Only a first chunk entered part way takes its gradients at other weights than W0.
    anchor = tuple(jnp.where(n == 0, a0, w) for a0, w in zip(anchor0, weights))
    for i in range(depth):
      if save_starts:
        r[f"ws_{i}"][n, :, :] = weights[i]
        r[f"ss_{i}"][n, :, :] = momentum[i]

      @pl.when(n == last_real)
      def _():
        r[f"last_a_{i}"][...] = anchor[i]

    y, weights, momentum = mlp_common.forward_chunk(
        _chunk_values(r, n, chunk), weights, momentum, anchor, activation, precise)
    r["y"][pl.ds(n * chunk, chunk), :] = y.astype(r["y"].dtype)
    return weights, momentum

  start = (tuple(r[f"w0_{i}"][...] for i in range(depth)),
           tuple(r[f"s0_{i}"][...] for i in range(depth)))
  weights, momentum = lax.fori_loop(0, num_chunks, step, start)
  for i in range(depth):
    r[f"w_{i}"][...] = weights[i]
    r[f"s_{i}"][...] = momentum[i]


def _specs(t, dk, chunk):
  """BlockSpecs on the (batch i, head j) grid, by kind of array."""
  return dict(
      rows=lambda width: pl.BlockSpec((None, None, t, width), lambda i, j: (i, j, 0, 0)),
      gates=pl.BlockSpec((None, None, t), lambda i, j: (i, j, 0)),
      layer=lambda shape: pl.BlockSpec((None, None) + shape, lambda i, j: (i, j, 0, 0)),
      starts=lambda shape: pl.BlockSpec((None, None, t // chunk) + shape,
                                        lambda i, j: (i, j, 0, 0, 0)),
  )


def _input_specs(spec, dk, chunk):
  return [spec["rows"](dk)] * 3 + [spec["rows"](chunk)] + [spec["gates"]] * 5


def forward(q, k, v, coefficients, weights0, momentum0, anchor0, *, chunk, activation,
            interpret, save_starts=False):
  """The MLP memory's chunk loop forward.

  Args:
    q, k, v: [B, H, T, K] (T a multiple of `chunk`).
    coefficients: dict of `COEFFICIENTS`, as in `memjax.kernels.titans.gpu.forward`.
    weights0, momentum0, anchor0: tuples of [B, H, d_in_i, d_out_i] float32, one per layer.
    activation: sigma's name.
    save_starts: also return every chunk's start W and S per layer [B, H, N, d_in, d_out].

  Returns:
    `(y [B, H, T, K] in v's dtype, weights, momentum, last_anchor)` (tuples per layer), then
    with `save_starts` the starts of W and of S (tuples per layer).
  """
  b, h, t, dk = q.shape
  depth = len(weights0)
  shapes = [w.shape[2:] for w in weights0]
  spec = _specs(t, dk, chunk)
  layer_specs = [spec["layer"](s) for s in shapes]
  states = [jax.ShapeDtypeStruct(w.shape, jnp.float32) for w in weights0]
  out_shape = [jax.ShapeDtypeStruct(v.shape, v.dtype)] + states * 3
  out_specs = [spec["rows"](dk)] + layer_specs * 3
  if save_starts:
    out_shape += [jax.ShapeDtypeStruct((b, h, t // chunk) + s, jnp.float32) for s in shapes] * 2
    out_specs += [spec["starts"](s) for s in shapes] * 2
  kernel = functools.partial(_forward_kernel, depth=depth, chunk=chunk, activation=activation,
                             precise=dcommon.float32_matmuls(q.dtype, interpret),
                             save_starts=save_starts)
  out = pl.pallas_call(
      kernel,
      out_shape=tuple(out_shape),
      grid=(b, h),
      in_specs=_input_specs(spec, dk, chunk) + layer_specs * 3,
      out_specs=tuple(out_specs),
      compiler_params=compat.triton_params(_WARPS, _STAGES),
      interpret=interpret,
      name="mlp_memory_forward",
  )(q, k, v, *(coefficients[n] for n in COEFFICIENTS), *weights0, *momentum0, *anchor0)
  return (out[0],) + mlp_common.by_layer(out[1:], depth)


def _backward_kernel(*refs, depth, chunk, activation, precise):
  """Refs: the forward's inputs (q ... mask, anchor0 per layer), the starts of W and S per
  layer [N, d_in, d_out], dy [T, K], dweights, dmomentum, dlast_anchor per layer; outputs
  dq, dk, dv [T, K], dcw [T, C], dd, db, dcs, de [T], dweights0, dmomentum0, danchor0 per
  layer."""
  names = (("q", "k", "v") + COEFFICIENTS
           + mlp_common.layer_names(depth, "a0_", "ws_", "ss_") + ("dy",)
           + mlp_common.layer_names(depth, "dw_", "ds_", "dla_") + mlp_common.GRADS
           + mlp_common.layer_names(depth, "dw0_", "ds0_", "da0_"))
  r = dict(zip(names, refs))
  num_chunks = r["q"].shape[0] // chunk
  last_real = last_real_chunk(r["mask"], num_chunks, chunk)

  def step(i, carry):
    dweights, dmomentum = carry
    n = num_chunks - 1 - i
    rows = pl.ds(n * chunk, chunk)
    weights = tuple(r[f"ws_{l}"][n, :, :] for l in range(depth))
    momentum = tuple(r[f"ss_{l}"][n, :, :] for l in range(depth))
    anchor = tuple(jnp.where(n == 0, r[f"a0_{l}"][...], w) for l, w in enumerate(weights))
    dx, dweights, dmomentum, danchor = mlp_common.backward_chunk(
        _chunk_values(r, n, chunk), weights, momentum, anchor, r["dy"][rows, :], dweights,
        dmomentum, activation, precise)
    for name in ("q", "k", "v", "cw"):
      r["d" + name][rows, :] = dx[name].astype(r["d" + name].dtype)
    for name in ("d", "b", "cs", "e"):
      r["d" + name][rows] = dx[name]
    new_dweights = []
    for l in range(depth):
      # The last real chunk's anchor is also an output (the state's anchor if it is partial).
      da = danchor[l] + jnp.where(n == last_real, r[f"dla_{l}"][...], 0.0)

      @pl.when(n == 0)
      def _():
        r[f"da0_{l}"][...] = da

      new_dweights.append(dweights[l] + jnp.where(n > 0, da, 0.0))
    return tuple(new_dweights), tuple(dmomentum)

  start = (tuple(r[f"dw_{l}"][...] for l in range(depth)),
           tuple(r[f"ds_{l}"][...] for l in range(depth)))
  dweights, dmomentum = lax.fori_loop(0, num_chunks, step, start)
  for l in range(depth):
    r[f"dw0_{l}"][...] = dweights[l]
    r[f"ds0_{l}"][...] = dmomentum[l]


def backward(q, k, v, coefficients, anchor0, weight_starts, momentum_starts, dy, dweights,
             dmomentum, dlast_anchor, *, chunk, activation, interpret):
  """The MLP memory's chunk loop backward: one reverse walk per head.

  Args:
    q, k, v, coefficients, anchor0: as in `forward`.
    weight_starts, momentum_starts: tuples per layer [B, H, N, d_in, d_out] from `forward`.
    dy: [B, H, T, K] cotangent of y.
    dweights, dmomentum, dlast_anchor: tuples per layer [B, H, d_in, d_out] float32.

  Returns:
    A dict: dq, dk, dv [B, H, T, K] in the inputs' dtype; dcw [B, H, T, C] and dd, db, dcs,
    de [B, H, T] float32; dweights0, dmomentum0, danchor0 tuples per layer.
  """
  b, h, t, dk = q.shape
  depth = len(anchor0)
  shapes = [a.shape[2:] for a in anchor0]
  spec = _specs(t, dk, chunk)
  layer_specs = [spec["layer"](s) for s in shapes]
  start_specs = [spec["starts"](s) for s in shapes]
  f32 = jnp.float32
  states = [jax.ShapeDtypeStruct(a.shape, f32) for a in anchor0]
  out = pl.pallas_call(
      functools.partial(_backward_kernel, depth=depth, chunk=chunk, activation=activation,
                        precise=dcommon.float32_matmuls(q.dtype, interpret)),
      out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype),
                 jax.ShapeDtypeStruct((b, h, t, chunk), f32))
      + (jax.ShapeDtypeStruct((b, h, t), f32),) * 4 + tuple(states) * 3,
      grid=(b, h),
      in_specs=(_input_specs(spec, dk, chunk) + layer_specs + start_specs * 2
                + [spec["rows"](dk)] + layer_specs * 3),
      out_specs=(spec["rows"](dk),) * 3 + (spec["rows"](chunk),) + (spec["gates"],) * 4
      + tuple(layer_specs) * 3,
      compiler_params=compat.triton_params(_WARPS, _STAGES),
      interpret=interpret,
      name="mlp_memory_backward",
  )(q, k, v, *(coefficients[n] for n in COEFFICIENTS), *anchor0, *weight_starts,
    *momentum_starts, dy, *dweights, *dmomentum, *dlast_anchor)
  return mlp_common.backward_grads(out, depth)
