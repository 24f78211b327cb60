"""The differentiable neural-memory chunk loop, for either chip's kernels.

`memjax.ops.neural_memory(..., implementation="pallas")` places the sequence in chunks and
computes every chunk's dual-form coefficients in XLA (they depend on the gates only, and
XLA differentiates them), then calls `memory_loop` (linear memory) or `mlp_memory_loop`
with the chip's kernel module (`gpu`, `tpu`, `mlp_gpu` or `mlp_tpu`): a module with
`forward(q, k, v, coefficients, weights0, momentum0, anchor0, *, interpret, save_starts,
**options)` and `backward(q, k, v, coefficients, anchor0, weight_starts, momentum_starts,
dy, dweights, dmomentum, dlast_anchor, *, interpret, **options)`, the options being the
chunk and value block (linear) or the chunk and activation (MLP).

When differentiated, the forward saves every chunk's start W and S (float32,
[B, H, N, d_in, d_out] per layer: the memory at chunk boundaries, nothing per token); the
backward recomputes each chunk from them.
"""

import functools

import jax
import jax.numpy as jnp

from memjax.kernels.titans import common
from memjax.kernels.titans import gpu
from memjax.kernels.titans import mlp_gpu
from memjax.kernels.titans import mlp_tpu
from memjax.kernels.titans import tpu

# Columns of the memory per program. GPU: 32 gives B * H * V / 32 programs, enough to fill
# the SMs at B * H = 32 with V = 64. TPU: one lane row.
DEFAULT_VALUE_BLOCK = {"gpu": 32, "tpu": 128}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _loop(chip, options, interpret, q, k, v, coefficients, weights0, momentum0, anchor0):
  return tuple(chip.forward(q, k, v, coefficients, weights0, momentum0, anchor0,
                            interpret=interpret, **dict(options)))


def _fwd(chip, options, interpret, q, k, v, coefficients, weights0, momentum0, anchor0):
  *out, weight_starts, momentum_starts = chip.forward(
      q, k, v, coefficients, weights0, momentum0, anchor0, interpret=interpret,
      save_starts=True, **dict(options))
  return tuple(out), (q, k, v, coefficients, anchor0, weight_starts, momentum_starts)


def _bwd(chip, options, interpret, residuals, cotangents):
  q, k, v, coefficients, anchor0, weight_starts, momentum_starts = residuals
  dy, dweights, dmomentum, dlast_anchor = cotangents
  grads = chip.backward(q, k, v, coefficients, anchor0, weight_starts, momentum_starts,
                        dy.astype(v.dtype), dweights, dmomentum, dlast_anchor,
                        interpret=interpret, **dict(options))
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
  options = (("chunk", blocks.chunk), ("value_block", blocks.value))
  return _loop(chip, options, interpret, q, k, v, coefficients, weights0, momentum0, anchor0)


def mlp_memory_loop(chip, q, k, v, coefficients, weights0, momentum0, anchor0, *, chunk,
                    activation, interpret):
  """The MLP memory's chunk loop (see `mlp_common`), differentiable in every input.

  Args:
    chip: the kernel module (`memjax.kernels.titans.mlp_gpu` or `.mlp_tpu`).
    q, k, v: [B, H, T, K] (T a multiple of `chunk`); coefficients as in `memory_loop`.
    weights0, momentum0, anchor0: tuples of [B, H, d_in_i, d_out_i] float32, one per layer.
    chunk: tokens per chunk (16, 32 or 64).
    activation: sigma's name in `memjax.ops.titans_memory.ACTIVATIONS`.
    interpret: run the kernel bodies in the Pallas interpreter (the value of `interpret=`).

  Returns:
    `(y [B, H, T, K] in v's dtype, weights, momentum, last_anchor)`, the last three tuples
    per layer as in `memory_loop`.
  """
  if chunk not in common.CHUNK_SIZES:
    raise ValueError(f"chunk must be one of {common.CHUNK_SIZES}, got {chunk}")
  options = (("chunk", chunk), ("activation", activation))
  return _loop(chip, options, interpret, q, k, v, coefficients, tuple(weights0),
               tuple(momentum0), tuple(anchor0))


def chunk_loop(q, k, v, coefficients, weights0, momentum0, anchor0, *, chunk_size, activation,
               platform, interpret, value_block=None):
  """The chunk loop with one platform's kernels: the linear memory's for a state of one
  layer, the MLP memory's for more.

  Args:
    q, k, v, coefficients: as in `memory_loop`.
    weights0, momentum0, anchor0: tuples of layers [B, H, d_in_i, d_out_i] float32.
    chunk_size: tokens per chunk; activation: sigma of the MLP memory.
    platform: "gpu" or "tpu", whose kernel bodies and default block sizes to use.
    interpret: the value of `interpret=` (False to compile for the platform).
    value_block: the linear memory's value columns per program; None for the default.

  Returns:
    `(y, weights, momentum, last_anchor)` with the last three tuples of layers (see
    `memory_loop`).
  """
  if len(weights0) > 1:
    chip = {"gpu": mlp_gpu, "tpu": mlp_tpu}[platform]
    return mlp_memory_loop(chip, q, k, v, coefficients, weights0, momentum0, anchor0,
                           chunk=chunk_size, activation=activation, interpret=interpret)
  chip = {"gpu": gpu, "tpu": tpu}[platform]
  blocks = common.BlockSizes(
      chunk=chunk_size, value=value_block or min(DEFAULT_VALUE_BLOCK[platform], v.shape[-1]))
  y, *state = memory_loop(chip, q, k, v, coefficients, weights0[0], momentum0[0], anchor0[0],
                          blocks=blocks, interpret=interpret)
  return (y,) + tuple((x,) for x in state)


def on_default_backend(q, k, v, coefficients, weights0, momentum0, anchor0, *, chunk_size,
                       activation):
  """`chunk_loop` on the default backend: Mosaic on a TPU, Triton on a GPU, the GPU body in
  the Pallas interpreter elsewhere."""
  backend = jax.default_backend()
  return chunk_loop(q, k, v, coefficients, weights0, momentum0, anchor0,
                    chunk_size=chunk_size, activation=activation,
                    platform="tpu" if backend == "tpu" else "gpu",
                    interpret=backend not in ("gpu", "tpu"))
