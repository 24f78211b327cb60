"""Context-parallel Titans neural memory (linear memory, "titans" rule) on meshes of 8
devices against the unsharded op: outputs, final state and vjp; bf16; errors.

The shards here run the xla form. With the Pallas kernel interpreted inside the shards,
XLA's CPU compiler (JAX 0.10.2) segfaulted, twice, when the check ran within the whole
suite (alone it passed); the kernel in shards is left to the GPU."""

import functools

import jax
import jax.numpy as jnp
import pytest

from memjax import ops
from memjax import sharding
from tests.sharding.test_context_parallel import _MESHES
from tests.sharding.test_context_parallel import _assert_vjp_matches

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py makes 8 CPU devices)")



def _inputs(key, *, b=2, t=64, h=2, dk=16, dv=16, gates=("eta", "alpha"), with_state=True,
            dtype=jnp.float32):
  """q, k, v, theta (and eta, alpha, initial_state as asked) by argument name."""
  keys = jax.random.split(key, 7)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  gate = lambda i, scale: scale * jax.nn.sigmoid(jax.random.normal(keys[i], (b, t, h)))
  x = {"q": unit(jax.random.normal(keys[0], (b, t, h, dk))).astype(dtype),
       "k": unit(jax.random.normal(keys[1], (b, t, h, dk))).astype(dtype),
       "v": jax.random.normal(keys[2], (b, t, h, dv)).astype(dtype),
       "theta": gate(3, 0.5).astype(dtype)}
  if "eta" in gates:
    x["eta"] = gate(4, 1.0).astype(dtype)
  if "alpha" in gates:
    x["alpha"] = gate(5, 0.2).astype(dtype)
  if with_state:
    weights = 0.3 * jax.random.normal(keys[6], (b, h, dk, dv))
    momentum = 0.1 * jax.random.normal(jax.random.fold_in(keys[6], 1), (b, h, dk, dv))
    x["weights"], x["momentum"] = weights, momentum
  return x


def _differentiable(fn):
  """`fn` as a function of float arrays only: the initial state as its weights and
  momentum (at a chunk start), the final state as its float arrays (position aside)."""
  def wrapped(x):
    x = dict(x)
    if "weights" in x:
      weights, momentum = x.pop("weights"), x.pop("momentum")
      x["initial_state"] = ops.NeuralMemoryState((weights,), (momentum,), (weights,), None,
                                                 jnp.zeros((), jnp.int32))
    out = fn(**x)
    if isinstance(out, tuple):
      y, state = out
      assert int(state.position) == 0
      return y, state.weights, state.momentum, state.anchor
    return out
  return wrapped


def _pair(mesh_name, implementation=None, **kwargs):
  """(context-parallel on `implementation`, unsharded xla) neural memory as functions of
  the dict of inputs."""
  cp = functools.partial(sharding.context_parallel_neural_memory,
                         mesh=sharding.make_mesh(_MESHES[mesh_name]),
                         implementation=implementation, **kwargs)
  ref = functools.partial(ops.neural_memory, implementation="xla", **kwargs)
  return _differentiable(cp), _differentiable(ref)


# Every mesh; momentum and forgetting or not; an initial state and the final state or not.
_CASES = [
    # mesh, gates, with_state
    ("seq8", ("eta", "alpha"), True),
    ("data2_seq4", ("eta",), False),
    ("data2_model2_seq2", (), True),
    ("data2_seq4", ("alpha",), True),
]


@pytest.mark.parametrize("mesh_name,gates,with_state", _CASES)
def test_neural_memory_matches_unsharded(key, mesh_name, gates, with_state):
  x = _inputs(key, gates=gates, with_state=with_state)
  cp, ref = _pair(mesh_name, return_final_state=with_state, chunk_size=8)
  _assert_vjp_matches(cp, ref, x, jax.random.fold_in(key, 1), jnp.float32)


def test_value_dim_apart_from_key_dim_and_bfloat16(key):
  x = _inputs(key, dk=16, dv=32, dtype=jnp.bfloat16)
  cp, ref = _pair("data2_seq4", return_final_state=True, chunk_size=16)
  _assert_vjp_matches(cp, ref, x, jax.random.fold_in(key, 1), jnp.bfloat16)


def test_final_state_continues_the_sequence(key):
  # Two context-parallel calls, the second from the first's final state, equal one call.
  x = _inputs(key, t=128, with_state=False)
  mesh = sharding.make_mesh({"data": 2, "seq": 4})
  cp = functools.partial(sharding.context_parallel_neural_memory, mesh=mesh, chunk_size=8)
  half = lambda d, part: {n: a[:, part * 64:(part + 1) * 64] for n, a in d.items()}
  y1, state = cp(**half(x, 0), return_final_state=True)
  y2 = cp(**half(x, 1), initial_state=state)
  whole = ops.neural_memory(**x, chunk_size=8, implementation="xla")
  got = jnp.concatenate([y1, y2], axis=1)
  assert float(jnp.max(jnp.abs(got - whole))) <= 1e-5 * float(jnp.max(jnp.abs(whole)))


def test_bad_arguments_raise(key):
  seq4 = sharding.make_mesh({"data": 2, "seq": 4})
  x = _inputs(key, with_state=False)
  cp = sharding.context_parallel_neural_memory
  with pytest.raises(ValueError, match=r"T / 4 seq devices = 16 tokens must be a multiple "
                                       r"of chunk_size = 32"):
    cp(**x, mesh=seq4, chunk_size=32)
  with pytest.raises(ValueError, match=r"loss 'l2' and retention 'l2'.*loss='lp'"):
    cp(**x, mesh=seq4, rule="moneta", chunk_size=8)
  mlp = ops.titans.init_state((jnp.zeros((2, 16, 32)), jnp.zeros((2, 32, 16))), 2)
  with pytest.raises(ValueError, match="2-layer MLP memory is not affine"):
    cp(**x, mesh=seq4, initial_state=mlp, chunk_size=8)
  state = _inputs(key)
  inside = ops.NeuralMemoryState((state["weights"],), (state["momentum"],),
                                 (state["weights"],), None, jnp.asarray(3, jnp.int32))
  with pytest.raises(ValueError, match="initial_state.position must be 0"):
    cp(**x, mesh=seq4, initial_state=inside, chunk_size=8)
  with pytest.raises(ValueError, match=r"B = 2 must be divisible by the 4 devices"):
    cp(**x, mesh=sharding.make_mesh({"data": 4, "seq": 2}), chunk_size=8)
  # The op's own checks come first, on the whole arrays.
  with pytest.raises(ValueError, match=r"k must have shape \[B, T, H, K\] like q"):
    cp(**{**x, "k": x["k"][:, :16]}, mesh=seq4, chunk_size=8)
  with pytest.raises(ValueError, match="theta holds non-finite values"):
    cp(**{**x, "theta": x["theta"].at[0, 0, 0].set(jnp.nan)}, mesh=seq4, chunk_size=8,
       check_finite=True)
