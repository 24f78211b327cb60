"""The differentiable neural-memory chunk loop, for either chip's kernels.

`memjax.ops.neural_memory(..., implementation="pallas")` places the sequence in chunks and
computes every chunk's dual-form coefficients in XLA (they depend on the gates only, and
XLA differentiates them), then calls `memory_loop` with the chip's kernel module (`gpu`
or `tpu`): a module with `forward(q, k, v, coefficients, weights0, momentum0, anchor0, *,
chunk, value_block, interpret, save_starts)` and `backward(q, k, v, coefficients, anchor0,
weight_starts, momentum_starts, dy, dweights, dmomentum, dlast_anchor, *, chunk,
value_block, interpret)`.

When differentiated, the forward saves every chunk's start W and S (float32,
[B, H, N, K, V]: the memory at chunk boundaries, nothing per token); the backward
recomputes each chunk from them.
"""

import functools

import jax
import jax.numpy as jnp

from memjax.kernels.titans import common
from memjax.kernels.titans import gpu
from memjax.kernels.titans import tpu

# Columns of the memory per program. GPU: 32 gives B * H * V / 32 programs, enough to fill
# the SMs at B * H = 32 with V = 64. TPU: one lane row.
DEFAULT_VALUE_BLOCK = {"gpu": 32, "tpu": 128}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _loop(chip, blocks, interpret, q, k, v, coefficients, weights0, momentum0, anchor0):
  return tuple(chip.forward(q, k, v, coefficients, weights0, momentum0, anchor0,
                            chunk=blocks.chunk, value_block=blocks.value,
                            interpret=interpret))


def _fwd(chip, blocks, interpret, q, k, v, coefficients, weights0, momentum0, anchor0):
  *out, weight_starts, momentum_starts = chip.forward(
      q, k, v, coefficients, weights0, momentum0, anchor0, chunk=blocks.chunk,
      value_block=blocks.value, interpret=interpret, save_starts=True)
  return tuple(out), (q, k, v, coefficients, anchor0, weight_starts, momentum_starts)


def _bwd(chip, blocks, interpret, residuals, cotangents):
  q, k, v, coefficients, anchor0, weight_starts, momentum_starts = residuals
  dy, dweights, dmomentum, dlast_anchor = cotangents
  grads = chip.backward(q, k, v, coefficients, anchor0, weight_starts, momentum_starts,
                        dy.astype(v.dtype), dweights, dmomentum, dlast_anchor,
                        chunk=blocks.chunk, value_block=blocks.value, interpret=interpret)
  dcoefficients = {name: grads["d" + name] for name in coefficients if name != "mask"}
  dcoefficients["mask"] = jnp.zeros_like(coefficients["mask"])  # Says where tokens are.
  return (grads["dq"].astype(q.dtype), grads["dk"].astype(k.dtype), grads["dv"],
          dcoefficients, grads["dweights0"], grads["dmomentum0"], grads["danchor0"])


_loop.defvjp(_fwd, _bwd)


def memory_loop(chip, q, k, v, coefficients, weights0, momentum0, anchor0, *, blocks,
                interpret):
  """The linear memory's chunk loop (see `common`), differentiable in every input.

  Args:
    chip: the kernel module (`memjax.kernels.titans.gpu` or `.tpu`).
    q, k: [B, H, T, K]; v: [B, H, T, V] (T a multiple of blocks.chunk).
    coefficients: dict of float32 arrays: cw [B, H, T, C] (row t holds its chunk's row
      t % C) and d, b, cs, e, mask [B, H, T] (mask: 1 for tokens, 0 for padding; the
      tokens must start in the first chunk and run without gaps).
    weights0, momentum0, anchor0: [B, H, K, V] float32, the state at the first chunk's
      start and the weights its gradients are taken at.
    blocks: `common.BlockSizes`.
    interpret: run the kernel bodies in the Pallas interpreter (the value of `interpret=`).

  Returns:
    `(y [B, H, T, V] in v's dtype, weights, momentum, last_anchor [B, H, K, V] float32)`:
    the final W and S, and the weights the gradients of the last chunk holding a token
    were taken at.
  """
  common.check_blocks(blocks, v.shape[-1])
  return _loop(chip, blocks, interpret, q, k, v, coefficients, weights0, momentum0, anchor0)


def on_default_backend(q, k, v, coefficients, weights0, momentum0, anchor0, *, chunk_size):
  """`memory_loop` with the default backend's kernels and block sizes: Mosaic on a TPU,
  Triton on a GPU, the GPU body in the Pallas interpreter elsewhere."""
  backend = jax.default_backend()
  chip = tpu if backend == "tpu" else gpu
  value_block = DEFAULT_VALUE_BLOCK["tpu" if backend == "tpu" else "gpu"]
  blocks = common.BlockSizes(chunk=chunk_size, value=min(value_block, v.shape[-1]))
  return memory_loop(chip, q, k, v, coefficients, weights0, momentum0, anchor0,
                     blocks=blocks, interpret=backend not in ("gpu", "tpu"))
