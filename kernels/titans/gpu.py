"""The neural-memory chunk loop on NVIDIA GPUs: Pallas via Triton.

One program per (value block, batch, head) walks the chunks in order with the memory's
W and S [K, Vb] in registers (`forward`), or in reverse with their cotangents
(`backward`). Arrays are heads first, [B, H, T, D], so that one head's rows are
contiguous; the per-chunk math is in `common`.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from memjax.kernels import compat
from memjax.kernels.titans import common

_WARPS = 4
_STAGES = 1
# The gate-derived inputs of a chunk, by name, in the order the kernels take them.
COEFFICIENTS = ("cw", "d", "b", "cs", "e", "mask")


def _chunk_values(refs, n, chunk):
  """The values `common.forward_chunk` reads for chunk n, from one head's whole-sequence
  refs (a dict: q, k [T, K]; v [T, Vb]; cw [T, C]; d, b, cs, e [T])."""
  rows = pl.ds(n * chunk, chunk)
  last = n * chunk + chunk - 1
  x = {name: refs[name][rows, :] for name in ("q", "k", "v", "cw")}
  x.update({name: refs[name][rows] for name in ("d", "b", "cs")})
  x.update(cw_last=refs["cw"][last, :], d_last=refs["d"][last], b_last=refs["b"][last],
           e_last=refs["e"][last])
  return x


_INPUTS = ("q", "k", "v") + COEFFICIENTS


def _last_real_chunk(mask_ref, num_chunks, chunk):
  """The last chunk that holds a token. The sequence is placed from the first chunk on,
  so only the last chunk can be all padding (when the sequence starts part way into the
  first), and every chunk before the last one that holds a token is complete."""
  empty = jnp.max(mask_ref[pl.ds((num_chunks - 1) * chunk, chunk)]) == 0.0
  return num_chunks - 1 - empty.astype(jnp.int32)


def _forward_kernel(*refs, chunk, precise, save_starts):
  """Refs: q, k [T, K]; v [T, Vb]; cw [T, C]; d, b, cs, e, mask [T]; weights0, momentum0,
  anchor0 [K, Vb]; then the outputs y [T, Vb], weights, momentum, last_anchor [K, Vb] and,
  with `save_starts`, weight_starts, momentum_starts [N, K, Vb]."""
  names = _INPUTS + ("weights0", "momentum0", "anchor0", "y", "weights", "momentum",
                     "last_anchor") + (("weight_starts", "momentum_starts") if save_starts
                                       else ())
  r = dict(zip(names, refs))
  num_chunks = r["q"].shape[0] // chunk
  last_real = _last_real_chunk(r["mask"], num_chunks, chunk)

  def step(n, carry):
    weights, momentum = carry
    # Only a first chunk entered part way takes its gradients at other weights than W0.
    anchor = jnp.where(n == 0, r["anchor0"][...], weights)
    if save_starts:
      r["weight_starts"][n, :, :] = weights
      r["momentum_starts"][n, :, :] = momentum

    @pl.when(n == last_real)
    def _():
      r["last_anchor"][...] = anchor

    y, weights, momentum = common.forward_chunk(
        _chunk_values(r, n, chunk), weights, momentum, anchor, precise)
    r["y"][pl.ds(n * chunk, chunk), :] = y.astype(r["y"].dtype)
    return weights, momentum

  weights, momentum = lax.fori_loop(0, num_chunks, step,
                                    (r["weights0"][...], r["momentum0"][...]))
  r["weights"][...] = weights
  r["momentum"][...] = momentum


def _specs(t, dk, chunk, value_block):
  """BlockSpecs on the (value block c, batch i, head j) grid, by kind of array."""
  return dict(
      keys=pl.BlockSpec((None, None, t, dk), lambda c, i, j: (i, j, 0, 0)),
      values=pl.BlockSpec((None, None, t, value_block), lambda c, i, j: (i, j, 0, c)),
      cw=pl.BlockSpec((None, None, t, chunk), lambda c, i, j: (i, j, 0, 0)),
      gates=pl.BlockSpec((None, None, t), lambda c, i, j: (i, j, 0)),
      states=pl.BlockSpec((None, None, dk, value_block), lambda c, i, j: (i, j, 0, c)),
      starts=pl.BlockSpec((None, None, t // chunk, dk, value_block),
                          lambda c, i, j: (i, j, 0, 0, c)),
      # Partial sums over value blocks: one slice per block along a leading axis.
      keys_part=pl.BlockSpec((None, None, None, t, dk), lambda c, i, j: (c, i, j, 0, 0)),
      cw_part=pl.BlockSpec((None, None, None, t, chunk), lambda c, i, j: (c, i, j, 0, 0)),
      gates_part=pl.BlockSpec((None, None, None, t), lambda c, i, j: (c, i, j, 0)),
  )


def _input_specs(spec):
  return [spec["keys"], spec["keys"], spec["values"], spec["cw"]] + [spec["gates"]] * 5


def forward(q, k, v, coefficients, weights0, momentum0, anchor0, *, chunk, value_block,
            interpret, save_starts=False):
  """The chunk loop forward.

  Args:
    q, k: [B, H, T, K]; v: [B, H, T, V] (T a multiple of `chunk`).
    coefficients: dict of `COEFFICIENTS`: cw [B, H, T, C] and d, b, cs, e, mask
      [B, H, T], float32 (row t of cw holds its chunk's row t % C; mask is 1 for tokens,
      0 for padding).
    weights0, momentum0, anchor0: [B, H, K, V] float32.
    save_starts: also return every chunk's start W and S [B, H, N, K, V] float32.

  Returns:
    `(y [B, H, T, V] in v's dtype, weights, momentum, last_anchor [B, H, K, V] float32)`
    (last_anchor: the weights the gradients of the last chunk holding a token were taken
    at), then the starts.
  """
  b, h, t, dk = q.shape
  dv = v.shape[-1]
  spec = _specs(t, dk, chunk, value_block)
  state = jax.ShapeDtypeStruct((b, h, dk, dv), jnp.float32)
  out_shape = [jax.ShapeDtypeStruct(v.shape, v.dtype), state, state, state]
  out_specs = [spec["values"]] + [spec["states"]] * 3
  if save_starts:
    out_shape += [jax.ShapeDtypeStruct((b, h, t // chunk, dk, dv), jnp.float32)] * 2
    out_specs += [spec["starts"]] * 2
  kernel = functools.partial(_forward_kernel, chunk=chunk, precise=q.dtype == jnp.float32,
                             save_starts=save_starts)
  return pl.pallas_call(
      kernel,
      out_shape=tuple(out_shape),
      grid=(dv // value_block, b, h),
      in_specs=_input_specs(spec) + [spec["states"]] * 3,
      out_specs=tuple(out_specs),
      compiler_params=compat.triton_params(_WARPS, _STAGES),
      interpret=interpret,
      name="neural_memory_forward",
  )(q, k, v, *(coefficients[n] for n in COEFFICIENTS), weights0, momentum0, anchor0)


_GRADS_PER_BLOCK = ("dq", "dk", "dcw", "dd", "db", "dcs", "de")


def _backward_kernel(*refs, chunk, precise):
  """Refs: the forward's inputs (q ... e, anchor0), weight_starts, momentum_starts
  [N, K, Vb], dy [T, Vb], dweights, dmomentum, dlast_anchor [K, Vb]; then the outputs dv
  [T, Vb], the partial dq, dk [T, K], dcw [T, C], dd, db, dcs, de [T], and dweights0,
  dmomentum0, danchor0 [K, Vb]."""
  names = (_INPUTS + ("anchor0", "weight_starts", "momentum_starts", "dy", "dweights",
                      "dmomentum", "dlast_anchor", "dv") + _GRADS_PER_BLOCK
           + ("dweights0", "dmomentum0", "danchor0"))
  r = dict(zip(names, refs))
  num_chunks = r["q"].shape[0] // chunk
  last_real = _last_real_chunk(r["mask"], num_chunks, chunk)

  def step(i, carry):
    dweights, dmomentum = carry
    n = num_chunks - 1 - i
    rows = pl.ds(n * chunk, chunk)
    weights, momentum = r["weight_starts"][n, :, :], r["momentum_starts"][n, :, :]
    anchor = jnp.where(n == 0, r["anchor0"][...], weights)
    grads = common.backward_chunk(_chunk_values(r, n, chunk), weights, momentum, anchor,
                                  r["dy"][rows, :], dweights, dmomentum, precise)
    # The last real chunk's anchor is also an output (the state's anchor if it is partial).
    danchor = grads["danchor"] + jnp.where(n == last_real, r["dlast_anchor"][...], 0.0)
    r["dv"][rows, :] = grads["dv"].astype(r["dv"].dtype)
    for name in ("dq", "dk", "dcw"):
      r[name][rows, :] = grads[name]
    for name in ("dd", "db", "dcs", "de"):
      r[name][rows] = grads[name]

    @pl.when(n == 0)
    def _():
      r["danchor0"][...] = danchor

    return grads["dweights"] + jnp.where(n > 0, danchor, 0.0), grads["dmomentum"]

  dweights, dmomentum = lax.fori_loop(0, num_chunks, step,
                                      (r["dweights"][...], r["dmomentum"][...]))
  r["dweights0"][...] = dweights
  r["dmomentum0"][...] = dmomentum


def backward(q, k, v, coefficients, anchor0, weight_starts, momentum_starts, dy, dweights,
             dmomentum, dlast_anchor, *, chunk, value_block, interpret):
  """The chunk loop backward: the chunks in reverse with the memory's cotangents on chip.

  Args:
    q, k, v, coefficients, anchor0: as in `forward`.
    weight_starts, momentum_starts: [B, H, N, K, V] float32 from `forward`.
    dy: [B, H, T, V] cotangent of y.
    dweights, dmomentum, dlast_anchor: [B, H, K, V] float32 cotangents of `forward`'s
      weights, momentum and last_anchor.

  Returns:
    A dict: dv [B, H, T, V] in v's dtype; dq, dk [B, H, T, K], dcw [B, H, T, C] and dd,
    db, dcs, de [B, H, T] float32 (summed over value blocks); dweights0, dmomentum0,
    danchor0 [B, H, K, V] float32.
  """
  b, h, t, dk = q.shape
  dv = v.shape[-1]
  blocks = dv // value_block
  spec = _specs(t, dk, chunk, value_block)
  f32 = jnp.float32
  state = jax.ShapeDtypeStruct((b, h, dk, dv), f32)
  part = lambda *dims: jax.ShapeDtypeStruct((blocks, b, h, t) + dims, f32)
  out_shape = ([jax.ShapeDtypeStruct(v.shape, v.dtype), part(dk), part(dk), part(chunk)]
               + [part()] * 4 + [state] * 3)
  out_specs = ([spec["values"], spec["keys_part"], spec["keys_part"], spec["cw_part"]]
               + [spec["gates_part"]] * 4 + [spec["states"]] * 3)
  in_specs = (_input_specs(spec) + [spec["states"], spec["starts"], spec["starts"],
                                    spec["values"]] + [spec["states"]] * 3)
  kernel = functools.partial(_backward_kernel, chunk=chunk, precise=q.dtype == jnp.float32)
  out = pl.pallas_call(
      kernel,
      out_shape=tuple(out_shape),
      grid=(blocks, b, h),
      in_specs=in_specs,
      out_specs=tuple(out_specs),
      compiler_params=compat.triton_params(_WARPS, _STAGES),
      interpret=interpret,
      name="neural_memory_backward",
  )(q, k, v, *(coefficients[n] for n in COEFFICIENTS), anchor0, weight_starts,
    momentum_starts, dy, dweights, dmomentum, dlast_anchor)
  grads = dict(zip(("dv",) + _GRADS_PER_BLOCK + ("dweights0", "dmomentum0", "danchor0"), out))
  for name in _GRADS_PER_BLOCK:
    grads[name] = jnp.sum(grads[name], axis=0)
  return grads
