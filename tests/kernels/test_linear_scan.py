"""linear_scan Pallas kernels (GPU body interpreted, TPU body in TPU interpret mode) against
the reference: forward and vjp, fp32 and bf16, both directions, ragged T and C."""

import jax
import jax.numpy as jnp
import pytest

from memjax import ops
from memjax.kernels import compat
from memjax.kernels.linear_scan import BlockSizes
from memjax.kernels.linear_scan import gpu
from memjax.kernels.linear_scan import tpu
from memjax.ops import dispatch
from tests.conftest import GRAD_RTOL, RTOL, assert_close

# T = 37 and C = 3 * 50 = 150 are multiples of none of the blocks below.
_SHAPE = (2, 37, 3, 50)
_KERNELS = {
    "gpu": lambda *x, reverse: gpu.linear_scan(
        *x, reverse=reverse, blocks=BlockSizes(time=8, channels=64), interpret=True),
    "tpu": lambda *x, reverse: tpu.linear_scan(
        *x, reverse=reverse, blocks=BlockSizes(time=16, channels=128),
        interpret=compat.tpu_interpret()),
}


def _inputs(key, shape, dtype):
  ka, kb, kh, kg = jax.random.split(key, 4)
  a = jax.random.uniform(ka, shape, minval=0.5, maxval=1.0).astype(dtype)
  b = jax.random.normal(kb, shape).astype(dtype)
  h0 = jax.random.normal(kh, shape[:1] + shape[2:])
  cotangent = jax.random.normal(kg, shape).astype(dtype)
  return (a, b, h0), cotangent


def _reference(*x, reverse):
  return ops.linear_scan(*x, reverse=reverse, implementation="reference")


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kernel", sorted(_KERNELS))
def test_forward_and_vjp_match_reference(key, kernel, dtype, reverse):
  args, cotangent = _inputs(key, _SHAPE, dtype)
  h, pullback = jax.vjp(lambda *x: _KERNELS[kernel](*x, reverse=reverse), *args)
  h_ref, pullback_ref = jax.vjp(lambda *x: _reference(*x, reverse=reverse), *args)
  assert h.shape == _SHAPE and h.dtype == dtype
  assert_close(h, h_ref, RTOL[dtype], "h")
  for name, got, want in zip(("da", "db", "dh0"), pullback(cotangent), pullback_ref(cotangent)):
    assert got.shape == want.shape and got.dtype == want.dtype, name
    assert_close(got, want, GRAD_RTOL[dtype], name)


def test_tpu_default_blocks(key):
  (a, b, h0), _ = _inputs(key, (2, 21, 3, 5), jnp.bfloat16)
  h = tpu.linear_scan(a, b, h0, interpret=compat.tpu_interpret())
  assert_close(h, _reference(a, b, h0, reverse=False), RTOL[jnp.bfloat16])


@pytest.mark.parametrize("reverse", [False, True])
def test_ops_routes_pallas(key, reverse):
  (a, b, h0), cotangent = _inputs(key, (2, 19, 3, 5), jnp.float32)
  run = lambda impl: jax.vjp(
      lambda *x: ops.linear_scan(*x, reverse=reverse, implementation=impl), *args)
  args = (a, b, h0)
  (h, pullback), (h_ref, pullback_ref) = run("pallas"), run("reference")
  assert_close(h, h_ref, RTOL[jnp.float32], "h")
  for got, want in zip(pullback(cotangent), pullback_ref(cotangent)):
    assert_close(got, want, GRAD_RTOL[jnp.float32])


def test_auto_picks_pallas_only_where_it_compiles():
  impls = {name: lambda *x, name=name: name for name in dispatch.IMPLEMENTATIONS}
  chosen = dispatch.choose("linear_scan", None, impls)
  if jax.default_backend() in ("gpu", "tpu"):
    assert chosen is impls["pallas"]
  else:
    assert chosen is impls["xla"]
  assert dispatch.choose("linear_scan", "pallas", impls) is impls["pallas"]


def test_illegal_block_sizes_are_refused():
  (a, b, h0), _ = _inputs(jax.random.key(0), (1, 8, 4), jnp.float32)
  with pytest.raises(ValueError, match="power-of-two channels"):
    gpu.linear_scan(a, b, h0, blocks=BlockSizes(time=8, channels=48), interpret=True)
  with pytest.raises(ValueError, match="multiple of 8 .* of 128"):
    tpu.linear_scan(a, b, h0, blocks=BlockSizes(time=12, channels=128),
                    interpret=compat.tpu_interpret())
