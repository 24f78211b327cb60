"""Every Pallas kernel lowers for the chip it is written for, checked on any host.

`jax.export` with `platforms=[...]` runs the Pallas lowering of a kernel (to Mosaic for
TPUs, to Triton for NVIDIA GPUs) without that chip being present, so an op, a layout or a
block shape the backend cannot express fails here. The lowered kernel is not compiled
(Mosaic's layout passes and Triton's PTX compiler run on the chip), so this complements
the interpreted tests, which check the math, and the `gpu`-marked suite, which runs it.
"""

import jax
import jax.numpy as jnp
from jax import export
import pytest

from memjax.kernels.delta_rule import BlockSizes as DeltaBlocks
from memjax.kernels.delta_rule import chunked as delta_chunked
from memjax.kernels.delta_rule import gpu as delta_gpu
from memjax.kernels.delta_rule import tpu as delta_tpu
from memjax.kernels.linear_scan import gpu as scan_gpu
from memjax.kernels.linear_scan import tpu as scan_tpu
from memjax.kernels.titans import BlockSizes as TitansBlocks
from memjax.kernels.titans import chunked as titans_chunked
from memjax.kernels.titans import gpu as titans_gpu
from memjax.kernels.titans import mlp_gpu
from memjax.kernels.titans import mlp_tpu
from memjax.kernels.titans import tpu as titans_tpu

# The custom call that carries a lowered kernel, by export platform.
_KERNEL_CALL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
# Triton kernels are serialised for the JAX version that made them; exporting them is
# refused unless allowed (nothing here is kept past the test).
_ALLOW_TRITON = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
_PLATFORMS = {"tpu": "tpu", "gpu": "cuda"}
_CHUNK = 64
B, T, H, D = 2, 128, 2, 64


def _kernel_calls(fn, platform, *args) -> int:
  """Lowers `fn(*args)` for `platform`; returns how many kernel calls the module holds."""
  exported = export.export(jax.jit(fn), platforms=[platform],
                           disabled_checks=_ALLOW_TRITON)(*args)
  return exported.mlir_module().count(_KERNEL_CALL[platform])


def _with_grad(fn, argnums):
  """`fn` and its gradient in every float input, each to be lowered."""
  loss = lambda *args: jnp.sum(jax.tree.leaves(fn(*args))[0].astype(jnp.float32))
  return {"forward": fn, "backward": jax.grad(loss, argnums=argnums)}


def _spec(shape, dtype):
  return jax.ShapeDtypeStruct(shape, dtype)


def _linear_scan(chip, dtype):
  module = {"tpu": scan_tpu, "gpu": scan_gpu}[chip]
  args = (_spec((B, T, 256), dtype), _spec((B, T, 256), dtype), _spec((B, 256), jnp.float32))
  return _with_grad(lambda a, b, h0: module.linear_scan(a, b, h0), (0, 1, 2)), args


def _delta_rule(chip, dtype, beta, gated):
  module = {"tpu": delta_tpu, "gpu": delta_gpu}[chip]
  blocks = DeltaBlocks(chunk=_CHUNK, value=D)

  def fn(q, k, v, beta_, g, state0):
    return delta_chunked.delta_rule(module, q, k, v, beta_ if beta else None,
                                    g if gated else None, scale=D ** -0.5,
                                    initial_state=state0, blocks=blocks, interpret=False)

  keys = _spec((B, T, H, D), dtype)
  gates = _spec((B, T, H), dtype)
  args = (keys, keys, keys, gates, gates, _spec((B, H, D, D), jnp.float32))
  return _with_grad(fn, (0, 1, 2, 3, 4, 5)), args


def _titans(chip, dtype):
  module = {"tpu": titans_tpu, "gpu": titans_gpu}[chip]
  blocks = TitansBlocks(chunk=_CHUNK, value=D if chip == "tpu" else 32)
  names = titans_gpu.COEFFICIENTS

  def fn(q, k, v, cw, d, b, cs, e, mask, w0, s0, a0):
    coefficients = dict(zip(names, (cw, d, b, cs, e, mask)))
    return titans_chunked.memory_loop(module, q, k, v, coefficients, w0, s0, a0,
                                      blocks=blocks, interpret=False)

  keys = _spec((B, H, T, D), dtype)
  gates = _spec((B, H, T), jnp.float32)
  state = _spec((B, H, D, D), jnp.float32)
  args = (keys, keys, keys, _spec((B, H, T, _CHUNK), jnp.float32)) + (gates,) * 5 + (state,) * 3
  return _with_grad(fn, tuple(range(12))), args


def _mlp_memory(chip, dtype):
  module = {"tpu": mlp_tpu, "gpu": mlp_gpu}[chip]
  names = titans_gpu.COEFFICIENTS
  hidden = 2 * D

  def fn(q, k, v, cw, d, b, cs, e, mask, w1, w2):
    coefficients = dict(zip(names, (cw, d, b, cs, e, mask)))
    weights = (w1, w2)
    return titans_chunked.mlp_memory_loop(module, q, k, v, coefficients, weights, weights,
                                          weights, chunk=_CHUNK, activation="gelu",
                                          interpret=False)

  keys = _spec((B, H, T, D), dtype)
  gates = _spec((B, H, T), jnp.float32)
  args = ((keys, keys, keys, _spec((B, H, T, _CHUNK), jnp.float32)) + (gates,) * 5
          + (_spec((B, H, D, hidden), jnp.float32), _spec((B, H, hidden, D), jnp.float32)))
  return _with_grad(fn, tuple(range(11))), args


_KERNELS = {
    "linear_scan": _linear_scan,
    "gated_delta_rule": lambda chip, dtype: _delta_rule(chip, dtype, beta=True, gated=True),
    "delta_rule": lambda chip, dtype: _delta_rule(chip, dtype, beta=True, gated=False),
    "gated_linear_attention": lambda chip, dtype: _delta_rule(chip, dtype, beta=False,
                                                              gated=True),
    "neural_memory": _titans,
    "mlp_memory": _mlp_memory,
}


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("chip", sorted(_PLATFORMS))
@pytest.mark.parametrize("kernel", sorted(_KERNELS))
def test_kernel_lowers_for_its_chip(kernel, chip, dtype, direction):
  fns, args = _KERNELS[kernel](chip, dtype)
  assert _kernel_calls(fns[direction], _PLATFORMS[chip], *args) >= 1
