"""Context-parallel linear scan, linear attention and delta rules on meshes of 8 devices
against the unsharded ops: outputs, final state and vjp; bf16; the kernel; errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from memjax import ops
from memjax import sharding
from tests.conftest import GRAD_RTOL, RTOL, assert_close, memory_inputs

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py makes 8 CPU devices)")

_MESHES = {
    "seq8": {"seq": 8},
    "data2_seq4": {"data": 2, "seq": 4},
    "data2_model2_seq2": {"data": 2, "model": 2, "seq": 2},
}
_OPS = {
    "delta_rule": (ops.delta_rule, sharding.context_parallel_delta_rule),
    "linear_attention": (ops.linear_attention, sharding.context_parallel_linear_attention),
    "linear_scan": (ops.linear_scan, sharding.context_parallel_linear_scan),
}


def _sharded(op, mesh_name, **kwargs):
  """The context-parallel `op` as a function of a dict of the arrays it differentiates."""
  fn = functools.partial(_OPS[op][1], mesh=sharding.make_mesh(_MESHES[mesh_name]), **kwargs)
  return lambda x: fn(**x)


@functools.lru_cache(maxsize=None)
def _unsharded(op, **kwargs):
  """The op under one jit, shared by the tests so that each shape compiles once."""
  fn = functools.partial(_OPS[op][0], **kwargs)
  return jax.jit(lambda x: fn(**x))


def _memory_inputs(key, op, gated, with_state, dtype=jnp.float32, b=2, t=96, h=2, dk=16,
                   dv=32):
  """q, k, v (and beta, g, initial_state as the case has them) by argument name."""
  x = memory_inputs(key, b, t, h, dk, dv, dtype=dtype, gated=gated)
  if op == "linear_attention":
    del x["beta"]
  if not gated:
    del x["g"]
  if not with_state:
    del x["initial_state"]
  return x


def _assert_vjp_matches(fn, ref, x, key, dtype):
  """Outputs and the vjp of a random cotangent of `fn` match `ref`, input by input."""
  out, pullback = jax.vjp(fn, x)
  out_ref, pullback_ref = jax.vjp(ref, x)
  leaves, tree = jax.tree.flatten(out)
  for i, (got, want) in enumerate(zip(leaves, jax.tree.leaves(out_ref))):
    assert got.shape == want.shape and got.dtype == want.dtype, f"output {i}"
    assert_close(got, want, RTOL[dtype], f"output {i}")
  cotangent = tree.unflatten([jax.random.normal(jax.random.fold_in(key, i), y.shape, y.dtype)
                              for i, y in enumerate(leaves)])
  (grads,), (grads_ref,) = pullback(cotangent), pullback_ref(cotangent)
  for name in x:
    assert grads[name].shape == x[name].shape and grads[name].dtype == x[name].dtype, name
    assert_close(grads[name], grads_ref[name], GRAD_RTOL[dtype], f"d{name}")


# Every mesh for every op; with the state (an initial state in, the final state out) or not.
# T = 96 leaves 12 tokens per shard on "seq8": not a multiple of the chunk of 16.
_MEMORY_CASES = [
    # op, gated, mesh, with_state
    ("delta_rule", True, "seq8", True),
    ("delta_rule", True, "data2_seq4", False),
    ("delta_rule", True, "data2_model2_seq2", True),
    ("delta_rule", False, "seq8", False),
    ("delta_rule", False, "data2_seq4", True),
    ("delta_rule", False, "data2_model2_seq2", False),
    ("linear_attention", True, "seq8", True),
    ("linear_attention", False, "data2_seq4", True),
    ("linear_attention", True, "data2_model2_seq2", False),
]


@pytest.mark.parametrize("op,gated,mesh_name,with_state", _MEMORY_CASES)
def test_memory_ops_match_unsharded(key, op, gated, mesh_name, with_state):
  x = _memory_inputs(key, op, gated, with_state)
  kwargs = dict(return_final_state=with_state, chunk_size=16)
  _assert_vjp_matches(_sharded(op, mesh_name, **kwargs), _unsharded(op, **kwargs), x,
                      jax.random.fold_in(key, 1), jnp.float32)


# [B, T] and [B, T, ...] layouts, forward and reversed, with and without h0.
_SCAN_CASES = [
    # mesh, trailing shape, reverse, with h0
    ("seq8", (), True, True),
    ("data2_seq4", (3,), False, False),
    ("data2_model2_seq2", (4, 3), True, True),
]


@pytest.mark.parametrize("mesh_name,trailing,reverse,with_h0", _SCAN_CASES)
def test_linear_scan_matches_unsharded(key, mesh_name, trailing, reverse, with_h0):
  ks = jax.random.split(key, 4)
  shape = (2, 64) + trailing
  x = dict(a=jax.nn.sigmoid(2 * jax.random.normal(ks[0], shape)),
           b=jax.random.normal(ks[1], shape))
  if with_h0:
    x["h0"] = jax.random.normal(ks[2], shape[:1] + shape[2:])
  _assert_vjp_matches(_sharded("linear_scan", mesh_name, reverse=reverse),
                      _unsharded("linear_scan", reverse=reverse), x, ks[3], jnp.float32)


def test_bfloat16_and_a_scale(key):
  x = _memory_inputs(key, "delta_rule", True, True, dtype=jnp.bfloat16)
  kwargs = dict(return_final_state=True, chunk_size=16, scale=0.3)
  _assert_vjp_matches(_sharded("delta_rule", "data2_seq4", **kwargs),
                      _unsharded("delta_rule", **kwargs), x, jax.random.fold_in(key, 1),
                      jnp.bfloat16)


def _pallas_calls(fn, x) -> int:
  """The kernel launches in the traced forward of `fn(x)` (nested jaxprs print inline)."""
  return str(jax.make_jaxpr(fn)(x)).count("pallas_call")


# dv 64: the local and response parts share one kernel call of width 64 + 64; dv 256:
# the kernels take no width 256 + 64, so each shard makes two calls.
@pytest.mark.parametrize("dv,calls_per_op_call", [(64, 1), (256, 2)])
def test_pallas_kernel_in_shards(key, dv, calls_per_op_call):
  # The kernel's head dims start at 64; its body runs in the interpreter, so T is short.
  x = _memory_inputs(key, "delta_rule", True, True, b=2, t=32, h=1, dk=64, dv=dv)
  kwargs = dict(return_final_state=True, chunk_size=16)
  sharded = _sharded("delta_rule", "data2_seq4", implementation="pallas", **kwargs)
  unsharded = _unsharded("delta_rule", implementation="pallas", **kwargs)
  assert _pallas_calls(sharded, x) == calls_per_op_call * _pallas_calls(unsharded, x)
  _assert_vjp_matches(sharded, _unsharded("delta_rule", implementation="xla", **kwargs), x,
                      jax.random.fold_in(key, 1), jnp.float32)


def test_pallas_scan_in_shards(key):
  a = jax.nn.sigmoid(jax.random.normal(jax.random.fold_in(key, 2), (2, 32, 8)))
  b = jax.random.normal(jax.random.fold_in(key, 3), (2, 32, 8))
  h = _sharded("linear_scan", "data2_seq4", implementation="pallas")(dict(a=a, b=b))
  assert_close(h, _unsharded("linear_scan")(dict(a=a, b=b)), RTOL[jnp.float32], "h")


def test_state_arguments_apart_and_layout(key):
  x = _memory_inputs(key, "delta_rule", True, True)
  mesh = sharding.make_mesh(_MESHES["data2_model2_seq2"])
  o = sharding.context_parallel_delta_rule(**x, mesh=mesh, chunk_size=16)
  assert_close(o, _unsharded("delta_rule", chunk_size=16)(x), RTOL[jnp.float32], "o")
  # The outputs stay split over the mesh as the inputs were; the final state over batch
  # and heads only.
  assert o.sharding.is_equivalent_to(
      jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), "seq", "model")), o.ndim)
  del x["initial_state"]
  o, final = sharding.context_parallel_delta_rule(**x, mesh=mesh, return_final_state=True,
                                                  chunk_size=16)
  o_ref, final_ref = _unsharded("delta_rule", return_final_state=True, chunk_size=16)(x)
  assert_close(o, o_ref, RTOL[jnp.float32], "o")
  assert_close(final, final_ref, RTOL[jnp.float32], "final state")
  assert final.sharding.is_equivalent_to(
      jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), "model")), final.ndim)


def test_bad_arguments_raise(key):
  mesh = sharding.make_mesh({"data": 2, "model": 2, "seq": 2})
  seq8 = sharding.make_mesh({"seq": 8})
  x = _memory_inputs(key, "delta_rule", True, False, b=2, t=36, h=2)
  cp = sharding.context_parallel_delta_rule
  with pytest.raises(ValueError, match=r"T = 36 must be divisible by the 8 devices of mesh "
                                       r"axes \('seq',\)"):
    cp(**x, mesh=seq8)
  with pytest.raises(ValueError, match=r"B = 2 must be divisible by the 4 devices of mesh "
                                       r"axes \('data', 'fsdp'\)"):
    cp(**x, mesh=sharding.make_mesh({"data": 4, "seq": 2}))
  with pytest.raises(ValueError, match=r"H = 2 must be divisible by the 4 devices"):
    cp(**x, mesh=sharding.make_mesh({"model": 4, "seq": 2}))
  with pytest.raises(ValueError, match=r"mesh axes \['sequence'\] are not in the mesh"):
    cp(**x, mesh=mesh, seq_axis="sequence")
  with pytest.raises(ValueError, match="must be different mesh axes"):
    cp(**x, mesh=mesh, head_axis="data")
  # The op's own checks come first, on the whole arrays.
  with pytest.raises(ValueError, match=r"k must have shape \[B, T, H, K\] like q"):
    cp(**{**x, "k": x["k"][:, :16]}, mesh=mesh)
  with pytest.raises(ValueError, match="implementation must be one of"):
    cp(**x, mesh=mesh, implementation="cuda")
  with pytest.raises(ValueError, match="g holds non-finite values"):
    cp(**{**x, "g": x["g"].at[0, 0, 0].set(jnp.nan)}, mesh=mesh, check_finite=True)
  a = jnp.full((2, 36, 4), 0.5)
  with pytest.raises(ValueError, match=r"T = 36 must be divisible by the 8 devices"):
    sharding.context_parallel_linear_scan(a, a, mesh=seq8)
  with pytest.raises(ValueError, match=r"a.shape\[2\] = 3 must be divisible by the 2 devices"):
    sharding.context_parallel_linear_scan(a[..., :3], a[..., :3], mesh=mesh)
  with pytest.raises(ValueError, match=r"h0 must have shape"):
    sharding.context_parallel_linear_scan(a, a, np.zeros((2, 5)), mesh=seq8)
