"""The differentiable delta-rule and linear-attention kernels, for any chip's passes.

`memjax.ops.delta_rule` / `linear_attention` validate their inputs and call these with the
chip's kernel module (`gpu` or `tpu`): a module with the forward passes
`wy(k, v, beta, gamma, *, chunk, interpret, inverse)` and `state(q, k, u, w, gamma,
state0, *, chunk, value_block, scale, out_dtype, interpret, save_residuals)`, the backward
passes `state_grad(q, k, w, do, gamma, dfinal, *, chunk, value_block, scale, interpret)`,
`qk_grads(q, k, w, do, vn, dvn, gamma, starts, dends, *, chunk, key_block, value_block,
scale, interpret)` and `wy_grads(k, v, a, beta, gamma, dw, dvn, dk, *, chunk, block,
interpret)` (see `backward`); and the block sizes `STATE_VALUE_BLOCK` and
`STATE_GRAD_VALUE_BLOCK` (value columns per program of the two state walks, the second by
op, narrowed by `walk_value_block` when there are few heads), `BACKWARD_BLOCK` (key columns
per program of `qk_grads`, and the column block of `wy_grads`) and `QK_GRADS_VALUE_BLOCK`
(value columns per loop step of `qk_grads`, by the inputs' bytes per element).

When differentiated, the forward also saves what the backward reads: W and each chunk's
inverse `(I + L)^-1` from the `wy` pass, and every chunk's start state [B, H, N, K, V] and
Vn = U - W S0 from the state pass, in the inputs' dtype (they are only ever matmul
operands, which round to it anyway). The backward recomputes everything else per chunk.
"""

import functools

import jax
import jax.numpy as jnp

from memjax.kernels.delta_rule import common
from memjax.kernels.delta_rule import gpu
from memjax.kernels.delta_rule import tpu


def walk_value_block(chip, widest, batch_heads, dv):
  """Value columns per program of a state walk over `batch_heads` (B * H) heads of V = `dv`:
  `widest` (or V), halved while the walk would have fewer than `chip.MIN_WALK_PROGRAMS`
  programs, but not below `chip.MIN_WALK_VALUE_BLOCK`. A walk is sequential over the chunks,
  so narrower blocks trade per-program width for programs to fill the chip with."""
  block = min(widest, dv)
  while (block // 2 >= chip.MIN_WALK_VALUE_BLOCK
         and batch_heads * (dv // block) < chip.MIN_WALK_PROGRAMS):
    block //= 2
  return block


def _padded(chunk, q, k, v, beta, g):
  """Inputs zero-padded to a multiple of the chunk, and gamma [B, T', H] float32 (zeros for
  `g=None`: not a cumulative sum of zeros, which XLA spends seconds constant-folding)."""
  length = -(-q.shape[1] // chunk) * chunk
  q, k, v = (common.pad_time(x, length) for x in (q, k, v))
  beta = None if beta is None else common.pad_time(beta, length)
  if g is None:
    gamma = jnp.zeros(q.shape[:3], jnp.float32)
  else:
    gamma = common.chunk_cumsum(common.pad_time(g, length), chunk)
  return q, k, v, beta, gamma


def _forward(chip, blocks, interpret, scale, save_residuals, q, k, v, beta, g, state0):
  """Runs the forward passes; returns `((o [B, T, H, V], final), residuals)`, the residuals
  a dict of what the backward reads when `save_residuals` (else None): the padded inputs
  and gamma, and what the passes saved."""
  length = q.shape[1]
  q, k, v, beta, gamma = _padded(blocks.chunk, q, k, v, beta, g)
  w, u, a = None, v, None
  if beta is not None:
    w, u, *a = chip.wy(k, v, beta, gamma, chunk=blocks.chunk, interpret=interpret,
                       inverse=save_residuals)
    a = a[0] if a else None
  o, final, *saved = chip.state(q, k, u, w, gamma, state0, chunk=blocks.chunk,
                                value_block=blocks.value, scale=scale, out_dtype=q.dtype,
                                interpret=interpret, save_residuals=save_residuals)
  residuals = None
  if save_residuals:
    residuals = dict(q=q, k=k, v=v, beta=beta, gamma=gamma, w=w, a=a, starts=saved[0],
                     v_new=saved[1] if beta is not None else v)
  return (o[:, :length], final), residuals


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _differentiable(chip, blocks, interpret, scale, q, k, v, beta, g, state0):
  return _forward(chip, blocks, interpret, scale, False, q, k, v, beta, g, state0)[0]


def _fwd(chip, blocks, interpret, scale, q, k, v, beta, g, state0):
  out, saved = _forward(chip, blocks, interpret, scale, True, q, k, v, beta, g, state0)
  # g only says whether dg is None and its dtype; the rest is in `saved`, already padded.
  return out, (saved, g)


def _bwd(chip, blocks, interpret, scale, residuals, cotangents):
  saved, g = residuals
  qp, kp, vp, betap, gamma, w = (saved[n] for n in ("q", "k", "v", "beta", "gamma", "w"))
  do, dfinal = cotangents
  length = do.shape[1]
  do = common.pad_time(do.astype(qp.dtype), qp.shape[1])
  dends, dvn, dstate0 = chip.state_grad(
      qp, kp, w, do, gamma, dfinal, chunk=blocks.chunk,
      value_block=walk_value_block(
          chip, chip.STATE_GRAD_VALUE_BLOCK["delta" if betap is not None else "linear"],
          qp.shape[0] * qp.shape[2], vp.shape[-1]),
      scale=scale,
      interpret=interpret)
  block = lambda *dims: min((chip.BACKWARD_BLOCK,) + dims)
  dq, dk, dw, dgamma = chip.qk_grads(
      qp, kp, w, do, saved["v_new"], dvn, gamma, saved["starts"], dends, chunk=blocks.chunk,
      key_block=block(kp.shape[-1]),
      value_block=min(chip.QK_GRADS_VALUE_BLOCK[qp.dtype.itemsize], vp.shape[-1]),
      scale=scale,
      interpret=interpret)
  dgamma = jnp.sum(dgamma, axis=0)
  if betap is not None:
    dk, dv, dbeta, dgamma_wy = chip.wy_grads(
        kp, vp, saved["a"], betap, gamma, dw, dvn, dk, chunk=blocks.chunk,
        block=block(kp.shape[-1], vp.shape[-1]), interpret=interpret)
    dgamma = dgamma + dgamma_wy
  else:
    dv, dbeta = dvn, None
  # gamma_i = g_1 + ... + g_i inside a chunk, so dg_t = dgamma_t + ... + dgamma_C.
  b, t, h = dgamma.shape
  dgamma = dgamma.reshape(b, t // blocks.chunk, blocks.chunk, h)
  dg = jnp.flip(jnp.cumsum(jnp.flip(dgamma, 2), axis=2), 2).reshape(b, t, h)
  cut = lambda x, like: None if like is None else x[:, :length].astype(like.dtype)
  return (cut(dq, qp), cut(dk, kp), cut(dv, vp), cut(dbeta, betap), cut(dg, g), dstate0)


_differentiable.defvjp(_fwd, _bwd)


def delta_rule(chip, q, k, v, beta, g, *, scale, initial_state, blocks, interpret):
  """`(o, final_state)` of the gated delta rule (linear attention when `beta` is None).

  Args:
    chip: the kernel module (`memjax.kernels.delta_rule.gpu` or `.tpu`).
    q, k: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H] or None; g: [B, T, H] log-decays
      or None; initial_state: [B, H, K, V] float32.
    scale: output scale.
    blocks: `common.BlockSizes`.
    interpret: run the kernel bodies in the Pallas interpreter (the value of `interpret=`).

  Returns:
    o [B, T, H, V] in q's dtype, final state [B, H, K, V] float32.
  """
  common.check_blocks(blocks, v.shape[-1])
  return _differentiable(chip, blocks, interpret, scale, q, k, v, beta, g,
                         initial_state.astype(jnp.float32))


def on_default_backend(q, k, v, beta, g, *, scale, initial_state, chunk_size):
  """`delta_rule` with the default backend's kernels and block sizes: Mosaic on a TPU,
  Triton on a GPU, the GPU body in the Pallas interpreter elsewhere. Arguments as in
  `delta_rule`; `chunk_size` is the chunk of the blocks."""
  backend = jax.default_backend()
  chip = tpu if backend == "tpu" else gpu
  value_block = walk_value_block(chip, chip.STATE_VALUE_BLOCK, q.shape[0] * q.shape[2],
                                 v.shape[-1])
  blocks = common.BlockSizes(chunk=chunk_size, value=value_block)
  return delta_rule(chip, q, k, v, beta, g, scale=scale, initial_state=initial_state,
                    blocks=blocks, interpret=backend not in ("gpu", "tpu"))
