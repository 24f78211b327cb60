"""The neural-memory chunk loop on NVIDIA GPUs: Pallas via Triton.

One program per (value block, batch, head) walks the chunks in order with the memory's
W and S [K, Vb] in registers (`forward`), or in reverse with their cotangents (the first
pass of `backward`, whose second pass runs one program per (batch, head, chunk)). Arrays
are heads first, [B, H, T, D], so that one head's rows are contiguous; the per-chunk math
is in `common`.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from memjax.kernels import compat
from memjax.kernels.delta_rule import common as dcommon
from memjax.kernels.titans import common

# Warps of the chunk walks (forward and the backward's first pass): from a sweep on an H100
# (B4-T4096-H8-K64, bf16), 4 warps 0.26-0.29 ms forward, 8 warps 0.34-0.44, 2 warps spill.
_WARPS = 4
_STAGES = 1
# Warps and value columns per loop step of the backward's per-chunk pass. H100,
# B8-T4096-H16-K64, whole backward: fp32 9.0 ms with 64 columns on 4 warps (32: 9.6, 16:
# 11.6; 8 warps 11.0-17.7); bf16 1.79 ms (16-32 columns 1.98-2.01).
_INPUT_GRADS_WARPS = 4
_INPUT_GRADS_VALUE_BLOCK = 64
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


def last_real_chunk(mask_ref, num_chunks, chunk):
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
  last_real = last_real_chunk(r["mask"], num_chunks, chunk)

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
  precise = dcommon.float32_matmuls(q.dtype, interpret)
  state = jax.ShapeDtypeStruct((b, h, dk, dv), jnp.float32)
  out_shape = [jax.ShapeDtypeStruct(v.shape, v.dtype), state, state, state]
  out_specs = [spec["values"]] + [spec["states"]] * 3
  if save_starts:
    out_shape += [jax.ShapeDtypeStruct((b, h, t // chunk, dk, dv), jnp.float32)] * 2
    out_specs += [spec["starts"]] * 2
  kernel = functools.partial(_forward_kernel, chunk=chunk, precise=precise,
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


def _state_grad_kernel(*refs, chunk, precise):
  """Refs: the forward's inputs (q ... mask, anchor0), weight_starts, momentum_starts
  [N, K, Vb], dy [T, Vb], dweights, dmomentum, dlast_anchor [K, Vb]; then the outputs dv,
  derr [T, Vb], dweight_ends, dmomentum_ends [N, K, Vb] and dweights0, dmomentum0,
  danchor0 [K, Vb]."""
  names = _INPUTS + ("anchor0", "weight_starts", "momentum_starts", "dy", "dweights",
                     "dmomentum", "dlast_anchor", "dv", "derr", "dweight_ends",
                     "dmomentum_ends", "dweights0", "dmomentum0", "danchor0")
  r = dict(zip(names, refs))
  num_chunks = r["q"].shape[0] // chunk
  last_real = last_real_chunk(r["mask"], num_chunks, chunk)

  def step(i, carry):
    dweights, dmomentum = carry
    n = num_chunks - 1 - i
    rows = pl.ds(n * chunk, chunk)
    r["dweight_ends"][n, :, :] = dweights
    r["dmomentum_ends"][n, :, :] = dmomentum
    weights, momentum = r["weight_starts"][n, :, :], r["momentum_starts"][n, :, :]
    anchor = jnp.where(n == 0, r["anchor0"][...], weights)
    derr, danchor, dweights, dmomentum = common.state_grad_chunk(
        _chunk_values(r, n, chunk), weights, momentum, anchor, r["dy"][rows, :], dweights,
        dmomentum, precise)
    # The last real chunk's anchor is also an output (the state's anchor if it is partial).
    danchor = danchor + jnp.where(n == last_real, r["dlast_anchor"][...], 0.0)
    r["derr"][rows, :] = derr
    r["dv"][rows, :] = (-2.0 * derr).astype(r["dv"].dtype)

    @pl.when(n == 0)
    def _():
      r["danchor0"][...] = danchor

    return dweights + jnp.where(n > 0, danchor, 0.0), dmomentum

  dweights, dmomentum = lax.fori_loop(0, num_chunks, step,
                                      (r["dweights"][...], r["dmomentum"][...]))
  r["dweights0"][...] = dweights
  r["dmomentum0"][...] = dmomentum


def _input_grads_kernel(*refs, value_block, precise):
  """Refs: one chunk's q, k [C, K], v [C, V], cw [C, C], d, b, cs [C]; anchor0 [K, V];
  the chunk's start W, S and end cotangents dW1, dS1 [K, V]; dy, derr [C, V]; outputs dq,
  dk [C, K], dcw [C, C], dd, db, dcs, de [C]."""
  names = ("q", "k", "v", "cw", "d", "b", "cs", "anchor0", "weights", "momentum",
           "dweights", "dmomentum", "dy", "derr") + _INPUT_GRADS
  r = dict(zip(names, refs))
  chunk = r["q"].shape[0]
  first = pl.program_id(2) == 0

  def load(name, cols):
    if name == "anchor":
      return jnp.where(first, r["anchor0"][:, cols], r["weights"][:, cols])
    return r[name][:, cols]

  x = {name: r[name][...] for name in ("q", "k", "cw", "d", "b", "cs")}
  x["cw_last"] = r["cw"][chunk - 1, :]
  grads = common.input_grads_chunk(load, x, r["v"].shape[1], value_block, precise)
  for name in _INPUT_GRADS:
    r[name][...] = grads[name]


_INPUT_GRADS = ("dq", "dk", "dcw", "dd", "db", "dcs", "de")


def backward(q, k, v, coefficients, anchor0, weight_starts, momentum_starts, dy, dweights,
             dmomentum, dlast_anchor, *, chunk, value_block, interpret):
  """The chunk loop backward: a reverse walk with the memory's cotangents on chip
  (`common.state_grad_chunk`), then one program per chunk for the rest
  (`common.input_grads_chunk`).

  Args:
    q, k, v, coefficients, anchor0: as in `forward`.
    weight_starts, momentum_starts: [B, H, N, K, V] float32 from `forward`.
    dy: [B, H, T, V] cotangent of y.
    dweights, dmomentum, dlast_anchor: [B, H, K, V] float32 cotangents of `forward`'s
      weights, momentum and last_anchor.

  Returns:
    A dict: dv [B, H, T, V] in v's dtype; dq, dk [B, H, T, K], dcw [B, H, T, C] and dd,
    db, dcs, de [B, H, T] float32; dweights0, dmomentum0, danchor0 [B, H, K, V] float32.
  """
  b, h, t, dk = q.shape
  dv = v.shape[-1]
  num_chunks = t // chunk
  spec = _specs(t, dk, chunk, value_block)
  precise = dcommon.float32_matmuls(q.dtype, interpret)
  f32 = jnp.float32
  state = jax.ShapeDtypeStruct((b, h, dk, dv), f32)
  ends = jax.ShapeDtypeStruct((b, h, num_chunks, dk, dv), f32)
  dv_out, derr, dweight_ends, dmomentum_ends, dweights0, dmomentum0, danchor0 = pl.pallas_call(
      functools.partial(_state_grad_kernel, chunk=chunk, precise=precise),
      out_shape=(jax.ShapeDtypeStruct(v.shape, v.dtype), jax.ShapeDtypeStruct(v.shape, f32),
                 ends, ends, state, state, state),
      grid=(dv // value_block, b, h),
      in_specs=(_input_specs(spec) + [spec["states"], spec["starts"], spec["starts"],
                                      spec["values"]] + [spec["states"]] * 3),
      out_specs=(spec["values"], spec["values"], spec["starts"], spec["starts"])
      + (spec["states"],) * 3,
      compiler_params=compat.triton_params(_WARPS, _STAGES),
      interpret=interpret,
      name="neural_memory_state_grad",
  )(q, k, v, *(coefficients[n] for n in COEFFICIENTS), anchor0, weight_starts,
    momentum_starts, dy, dweights, dmomentum, dlast_anchor)

  rows = lambda d: pl.BlockSpec((None, None, chunk, d), lambda i, j, n: (i, j, n, 0))
  gates = pl.BlockSpec((None, None, chunk), lambda i, j, n: (i, j, n))
  whole = pl.BlockSpec((None, None, dk, dv), lambda i, j, n: (i, j, 0, 0))
  per_chunk = pl.BlockSpec((None, None, None, dk, dv), lambda i, j, n: (i, j, n, 0, 0))
  out = pl.pallas_call(
      functools.partial(_input_grads_kernel, value_block=min(_INPUT_GRADS_VALUE_BLOCK, dv),
                        precise=precise),
      out_shape=(jax.ShapeDtypeStruct(q.shape, f32),) * 2
      + (jax.ShapeDtypeStruct((b, h, t, chunk), f32),)
      + (jax.ShapeDtypeStruct((b, h, t), f32),) * 4,
      grid=(b, h, num_chunks),
      in_specs=[rows(dk), rows(dk), rows(dv), rows(chunk), gates, gates, gates, whole]
      + [per_chunk] * 4 + [rows(dv)] * 2,
      out_specs=(rows(dk), rows(dk), rows(chunk)) + (gates,) * 4,
      compiler_params=compat.triton_params(_INPUT_GRADS_WARPS, _STAGES),
      interpret=interpret,
      name="neural_memory_input_grads",
  )(q, k, v, coefficients["cw"], coefficients["d"], coefficients["b"], coefficients["cs"],
    anchor0, weight_starts, momentum_starts, dweight_ends, dmomentum_ends, dy, derr)
  grads = dict(zip(_INPUT_GRADS, out))
  grads.update(dv=dv_out, dweights0=dweights0, dmomentum0=dmomentum0, danchor0=danchor0)
  return grads
