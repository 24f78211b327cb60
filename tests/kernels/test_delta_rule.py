"""Delta-rule / linear-attention Pallas kernels (GPU body interpreted, TPU body in TPU
interpret mode) against the step-by-step reference: outputs, final state and vjp."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax import ops
from memjax.kernels import compat
from memjax.kernels.delta_rule import BlockSizes
from memjax.kernels.delta_rule import chunked
from memjax.kernels.delta_rule import common as kernel_common
from memjax.kernels.delta_rule import gpu
from memjax.kernels.delta_rule import tpu
from memjax.ops import dispatch
from tests.conftest import GRAD_RTOL, RTOL, assert_close, memory_inputs

_CHIPS = {"gpu": (gpu, True), "tpu": (tpu, compat.tpu_interpret())}
_VALUE_BLOCK = {"gpu": 64, "tpu": 128}
_GRADS = ("dq", "dk", "dv", "dbeta", "dg", "dinitial_state")


def _kernel(op, chip, blocks):
  module, interpret = _CHIPS[chip]

  def run(q, k, v, beta, g, initial_state):
    return chunked.delta_rule(
        module, q, k, v, beta if op == "delta_rule" else None, g, scale=q.shape[-1] ** -0.5,
        initial_state=initial_state, blocks=blocks, interpret=interpret)
  return run


def _reference(op):
  def run(q, k, v, beta, g, initial_state):
    if op == "delta_rule":
      return ops.delta_rule(q, k, v, beta, g, initial_state=initial_state,
                            return_final_state=True, implementation="reference")
    return ops.linear_attention(q, k, v, g, initial_state=initial_state,
                                return_final_state=True, implementation="reference")
  return run


def _args(x):
  g = x["g"] if x["g"] is not None else jnp.zeros(x["beta"].shape, jnp.float32)
  return x["q"], x["k"], x["v"], x["beta"], g, x["initial_state"]


# T = 41 is a multiple of no chunk; K = 64 != V = 128 catches transposed tiles.
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("op", ["delta_rule", "linear_attention"])
@pytest.mark.parametrize("chip", sorted(_CHIPS))
def test_forward_matches_reference(key, chip, op, dtype, gated):
  x = memory_inputs(key, 1, 41, 2, 64, 128, dtype=dtype, gated=gated)
  blocks = BlockSizes(chunk=32, value=64 if chip == "gpu" else 128)
  o, final = jax.jit(_kernel(op, chip, blocks))(*_args(x))
  o_ref, final_ref = _reference(op)(*_args(x))
  assert o.shape == o_ref.shape and o.dtype == dtype and final.dtype == jnp.float32
  assert_close(o, o_ref, RTOL[dtype], "o")
  assert_close(final, final_ref, RTOL[dtype], "final state")


@pytest.mark.parametrize("chunk", [16, 64])
def test_chunk_sizes_and_square_heads(key, chunk):
  x = memory_inputs(key, 2, 70, 1, 128, 64, dtype=jnp.float32)
  o, final = jax.jit(_kernel("delta_rule", "gpu", BlockSizes(chunk=chunk, value=32)))(*_args(x))
  o_ref, final_ref = _reference("delta_rule")(*_args(x))
  assert_close(o, o_ref, RTOL[jnp.float32], "o")
  assert_close(final, final_ref, RTOL[jnp.float32], "final state")


# Every chip x op, both dtypes, gated or not, chunks 16/32/64, T a multiple of no chunk and
# K != V both ways (transposed tiles would show).
_VJP_CASES = [
    # chip, op, dtype, gated, chunk, T, K, V
    ("gpu", "delta_rule", jnp.float32, True, 16, 37, 64, 128),
    ("gpu", "delta_rule", jnp.float32, False, 64, 70, 128, 64),
    ("gpu", "delta_rule", jnp.bfloat16, True, 32, 41, 128, 64),
    ("gpu", "delta_rule", jnp.bfloat16, False, 16, 37, 64, 128),
    ("gpu", "linear_attention", jnp.float32, True, 32, 41, 64, 128),
    ("gpu", "linear_attention", jnp.bfloat16, False, 64, 70, 128, 64),
    ("tpu", "delta_rule", jnp.float32, True, 32, 41, 128, 64),
    ("tpu", "delta_rule", jnp.bfloat16, True, 64, 70, 64, 128),
    ("tpu", "delta_rule", jnp.float32, False, 16, 37, 64, 128),
    ("tpu", "linear_attention", jnp.float32, False, 16, 37, 128, 64),
    ("tpu", "linear_attention", jnp.bfloat16, True, 32, 41, 64, 128),
]


@pytest.mark.parametrize("chip,op,dtype,gated,chunk,t,dk,dv", _VJP_CASES)
def test_vjp_matches_reference(key, chip, op, dtype, gated, chunk, t, dk, dv):
  x = memory_inputs(key, 1, t, 2, dk, dv, dtype=dtype, gated=gated)
  cotangents = (jax.random.normal(jax.random.fold_in(key, 1), x["v"].shape, dtype),
                jax.random.normal(jax.random.fold_in(key, 2), x["initial_state"].shape))
  # A value block below V makes the backward's chunk pass walk several value blocks.
  blocks = BlockSizes(chunk=chunk, value=min(_VALUE_BLOCK[chip], dv // 2 if chip == "gpu"
                                             else dv))
  _, pullback = jax.vjp(_kernel(op, chip, blocks), *_args(x))
  _, pullback_ref = jax.vjp(_reference(op), *_args(x))
  for name, got, want, primal in zip(_GRADS, pullback(cotangents), pullback_ref(cotangents),
                                     _args(x)):
    if op == "linear_attention" and name == "dbeta":
      continue  # linear attention has no beta: both cotangents are zero by construction
    assert got.shape == primal.shape and got.dtype == primal.dtype, name
    assert_close(got, want, GRAD_RTOL[dtype], name)


def test_ops_route_to_the_kernel_on_request(key):
  x = memory_inputs(key, 1, 20, 1, 64, 64)
  o = ops.delta_rule(**x, implementation="pallas", chunk_size=16)
  assert_close(o, ops.delta_rule(**x, implementation="reference"), RTOL[jnp.float32], "o")
  o = ops.linear_attention(x["q"], x["k"], x["v"], x["g"], initial_state=x["initial_state"],
                           implementation="pallas", chunk_size=16)
  o_ref = ops.linear_attention(x["q"], x["k"], x["v"], x["g"],
                               initial_state=x["initial_state"], implementation="reference")
  assert_close(o, o_ref, RTOL[jnp.float32], "o")


def test_unsupported_shapes_fall_back_or_raise(key, monkeypatch):
  x = memory_inputs(key, 1, 20, 1, 24, 24)  # head dim 24: no kernel
  with pytest.raises(ValueError, match="head dims"):
    ops.delta_rule(**x, implementation="pallas")
  with pytest.raises(ValueError, match="chunk_size"):
    ops.delta_rule(**memory_inputs(key, 1, 20, 1, 64, 64), implementation="pallas",
                   chunk_size=8)
  # As on a GPU: None picks the kernel where it can and the xla form where it cannot.
  monkeypatch.setattr(dispatch, "pallas_compiles", lambda: True)
  np.testing.assert_array_equal(ops.delta_rule(**x), ops.delta_rule(**x, implementation="xla"))


def test_float32_on_a_gpu_defaults_to_the_xla_form(key, monkeypatch):
  # The GPU kernels' float32 matmuls run on the CUDA cores (see slower_than_xla).
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  x = memory_inputs(key, 1, 20, 1, 64, 64)
  assert x["k"].dtype == jnp.float32
  np.testing.assert_array_equal(ops.delta_rule(**x), ops.delta_rule(**x, implementation="xla"))
  args = (x["q"], x["k"], x["v"], x["g"])
  np.testing.assert_array_equal(ops.linear_attention(*args),
                                ops.linear_attention(*args, implementation="xla"))
  assert kernel_common.slower_than_xla(x["k"].astype(jnp.bfloat16)) is None
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert kernel_common.slower_than_xla(x["k"]) is None


def test_a_slower_kernel_is_skipped_by_default_but_runs_when_asked(monkeypatch):
  impls = {"xla": lambda: "xla", "pallas": lambda: "pallas"}
  monkeypatch.setattr(dispatch, "pallas_compiles", lambda: True)
  assert dispatch.choose("op", None, impls)() == "pallas"
  assert dispatch.choose("op", None, impls, pallas_slower="slow")() == "xla"
  assert dispatch.choose("op", "pallas", impls, pallas_slower="slow")() == "pallas"


# (batch * heads, V) -> value columns per program of the GPU walks (widest 64) and the TPU's.
@pytest.mark.parametrize("batch_heads,dv,gpu_block,tpu_block", [
    (128, 128, 64, 128),  # 256 programs at 64 columns: no narrowing
    (64, 128, 64, 128),   # exactly 128 programs
    (32, 128, 32, 128),   # B2 H16: 64 programs at 64, 128 at 32
    (16, 128, 16, 128),   # B1 H16: 128 at 16
    (1, 128, 16, 128),    # never below 16 columns
    (4, 64, 16, 64),      # V narrower than the widest block
])
def test_walk_value_block_narrows_for_few_heads(batch_heads, dv, gpu_block, tpu_block):
  assert chunked.walk_value_block(gpu, 64, batch_heads, dv) == gpu_block
  assert chunked.walk_value_block(tpu, tpu.STATE_VALUE_BLOCK, batch_heads, dv) == tpu_block
  assert batch_heads * dv // gpu_block >= gpu.MIN_WALK_PROGRAMS or gpu_block == 16


@pytest.mark.parametrize("dtype, width, programs, stages", [
    (jnp.bfloat16, 128, 128, 3),   # one program per SM: prefetch deeper
    (jnp.bfloat16, 128, 256, 2),   # two programs per SM hide each other's loads
    (jnp.bfloat16, 256, 64, 2),    # three stages of 512-byte rows overflow shared memory
    (jnp.float32, 128, 64, 2),
    (jnp.float32, 256, 64, 1),
    (jnp.bfloat16, 128, None, 2),  # not a walk
])
def test_pipeline_stages_deepen_only_for_narrow_walks_of_few_programs(dtype, width, programs,
                                                                      stages):
  rows = jax.ShapeDtypeStruct((1, 64, 1, width), dtype)
  assert gpu.pipeline_stages(rows, rows, programs=programs) == stages


@pytest.mark.parametrize("blocks", [BlockSizes(chunk=48, value=64), BlockSizes(value=48),
                                    BlockSizes(value=256)])
def test_illegal_blocks_raise(key, blocks):
  x = memory_inputs(key, 1, 8, 1, 64, 128)
  with pytest.raises(ValueError, match="blocks"):
    _kernel("delta_rule", "gpu", blocks)(*_args(x))
