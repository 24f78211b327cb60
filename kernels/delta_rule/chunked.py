"""The differentiable delta-rule and linear-attention kernels, for any chip's two passes.

`memjax.ops.delta_rule` / `linear_attention` validate their inputs and call these with the
chip's kernel module (`gpu` or `tpu`): a module with `wy(k, v, beta, gamma, *, chunk,
interpret)` and `state(q, k, u, w, gamma, state0, *, chunk, value_block, scale, out_dtype,
interpret)`.

The backward pass is, for now, the vector-Jacobian product of the chunkwise XLA form
(recomputed from the inputs; nothing but the inputs is saved).
"""

import functools

import jax
import jax.numpy as jnp

from memjax.kernels.delta_rule import common
from memjax.kernels.delta_rule import gpu
from memjax.kernels.delta_rule import tpu

# Columns of the state per program of the state pass. GPU: 64 keeps a [128, 64] float32
# state in the registers of four warps and gives B * H * V / 64 programs. TPU: one lane row.
DEFAULT_VALUE_BLOCK = {"gpu": 64, "tpu": 128}


def _forward(chip, blocks, interpret, scale, q, k, v, beta, g, state0):
  """Pads T to a multiple of the chunk, runs the passes, returns (o [B, T, H, V], final)."""
  length = q.shape[1]
  padded = -(-length // blocks.chunk) * blocks.chunk
  q, k, v = (common.pad_time(x, padded) for x in (q, k, v))
  if g is None:  # Not a cumulative sum of zeros, which XLA spends seconds constant-folding.
    gamma = jnp.zeros(q.shape[:3], jnp.float32)
  else:
    gamma = common.chunk_cumsum(common.pad_time(g, padded), blocks.chunk)
  w = None
  if beta is not None:
    w, v = chip.wy(k, v, common.pad_time(beta, padded), gamma, chunk=blocks.chunk,
                   interpret=interpret)
  o, final = chip.state(q, k, v, w, gamma, state0, chunk=blocks.chunk,
                        value_block=blocks.value, scale=scale, out_dtype=q.dtype,
                        interpret=interpret)
  return o[:, :length], final


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _differentiable(chip, blocks, interpret, scale, xla_form, q, k, v, beta, g, state0):
  return _forward(chip, blocks, interpret, scale, q, k, v, beta, g, state0)


def _fwd(chip, blocks, interpret, scale, xla_form, q, k, v, beta, g, state0):
  out = _forward(chip, blocks, interpret, scale, q, k, v, beta, g, state0)
  return out, (q, k, v, beta, g, state0)


def _bwd(chip, blocks, interpret, scale, xla_form, residuals, cotangents):
  del chip, interpret
  q, k, v, beta, g, state0 = residuals
  run = lambda q, k, v, beta, g, s: xla_form(q, k, v, beta, g, scale, s, blocks.chunk)
  outs, vjp = jax.vjp(run, q, k, v, beta, g, state0)
  # The XLA form returns float32 outputs; the kernel returns them in q's dtype.
  return vjp(jax.tree.map(lambda c, o: c.astype(o.dtype), cotangents, outs))


_differentiable.defvjp(_fwd, _bwd)


def delta_rule(chip, q, k, v, beta, g, *, scale, initial_state, blocks, interpret,
               xla_form):
  """`(o, final_state)` of the gated delta rule (linear attention when `beta` is None).

  Args:
    chip: the kernel module (`memjax.kernels.delta_rule.gpu` or `.tpu`).
    q, k: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H] or None; g: [B, T, H] log-decays
      or None; initial_state: [B, H, K, V] float32.
    scale: output scale.
    blocks: `common.BlockSizes`.
    interpret: run the kernel bodies in the Pallas interpreter (the value of `interpret=`).
    xla_form: `f(q, k, v, beta, g, scale, state, chunk_size) -> (o, final)`, the chunkwise
      XLA form of the same op, whose vjp is the backward pass.

  Returns:
    o [B, T, H, V] in q's dtype, final state [B, H, K, V] float32.
  """
  common.check_blocks(blocks, v.shape[-1])
  return _differentiable(chip, blocks, interpret, scale, xla_form, q, k, v, beta, g,
                         initial_state.astype(jnp.float32))


def on_default_backend(q, k, v, beta, g, *, scale, initial_state, chunk_size, xla_form):
  """`delta_rule` with the default backend's kernels and block sizes: Mosaic on a TPU,
  Triton on a GPU, the GPU body in the Pallas interpreter elsewhere. Arguments as in
  `delta_rule`; `chunk_size` is the chunk of the blocks."""
  backend = jax.default_backend()
  chip = tpu if backend == "tpu" else gpu
  value_block = DEFAULT_VALUE_BLOCK["tpu" if backend == "tpu" else "gpu"]
  blocks = common.BlockSizes(chunk=chunk_size, value=min(value_block, v.shape[-1]))
  return delta_rule(chip, q, k, v, beta, g, scale=scale, initial_state=initial_state,
                    blocks=blocks, interpret=backend not in ("gpu", "tpu"), xla_form=xla_form)
