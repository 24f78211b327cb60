"""Neural-memory Pallas kernels (GPU body interpreted, TPU body in TPU interpret mode)
against the chunkwise xla path: outputs, final state and vjp of every input, from a fresh
state and from one left part way into a chunk."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax import ops
from memjax.kernels import compat
from memjax.kernels.titans import BlockSizes
from memjax.kernels.titans import chunked
from memjax.kernels.titans import gpu
from memjax.kernels.titans import tpu
from memjax.ops import titans
from tests.conftest import GRAD_RTOL, RTOL, assert_close

_CHIPS = {"gpu": (gpu, True), "tpu": (tpu, compat.tpu_interpret())}
_STATE_FIELDS = ("weights", "momentum", "anchor")


def _inputs(key, b, t, h, dk, dv, dtype):
  """q, k (unit norm), v in `dtype`; theta, eta, alpha in their ranges; a random state."""
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  gate = lambda: 1 / (1 + np.exp(-normal(b, t, h)))
  k = normal(b, t, h, dk)
  arrays = dict(q=normal(b, t, h, dk), k=k / np.linalg.norm(k, axis=-1, keepdims=True),
                v=normal(b, t, h, dv))
  inputs = {n: jnp.asarray(x, dtype) for n, x in arrays.items()}
  inputs.update(theta=jnp.asarray(0.2 * gate()), eta=jnp.asarray(gate()),
                alpha=jnp.asarray(0.2 * gate()))
  weights = jnp.asarray(0.5 * normal(h, dk, dv))
  return inputs, titans.init_state((weights,), b)


def _midway(state, inputs, tokens, chunk):
  """The state after the first `tokens` tokens (by the xla path): part way into a chunk,
  with momentum, and an anchor that differs from the weights."""
  head = {n: x[:, :tokens] for n, x in inputs.items()}
  _, state = jax.jit(functools.partial(
      ops.neural_memory, chunk_size=chunk, return_final_state=True, implementation="xla"))(
          **head, initial_state=state)
  assert int(state.position) == tokens % chunk
  return state


def _run(implementation, chunk, inputs, state):
  y, final = ops.neural_memory(**inputs, initial_state=state, chunk_size=chunk,
                               return_final_state=True, implementation=implementation)
  return y, tuple(getattr(final, n)[0] for n in _STATE_FIELDS)


@pytest.fixture
def kernel_on(monkeypatch):
  """Routes `implementation="pallas"` to a given chip's kernel body and block sizes."""
  def use(chip, value_block):
    module, interpret = _CHIPS[chip]

    def run(*args, chunk_size):
      blocks = BlockSizes(chunk=chunk_size, value=value_block)
      return chunked.memory_loop(module, *args, blocks=blocks, interpret=interpret)
    monkeypatch.setattr(chunked, "on_default_backend", run)
  return use


# T never a multiple of the chunk; K != V both ways (transposed tiles would show); GPU value
# blocks of 32 and 16 split V over programs, whose partial dq, dk and gate cotangents sum.
_CASES = [
    # chip, value block, dtype, chunk, T, K, V, tokens seen before (None: no initial state)
    ("gpu", 32, jnp.float32, 16, 37, 64, 64, None),
    ("gpu", 32, jnp.float32, 64, 70, 64, 64, 0),
    ("gpu", 16, jnp.float32, 32, 45, 64, 128, 21),
    ("gpu", 64, jnp.bfloat16, 16, 37, 128, 64, 5),
    ("tpu", 64, jnp.float32, 16, 37, 64, 64, 9),
    ("tpu", 128, jnp.bfloat16, 32, 45, 64, 128, 0),
]


@pytest.mark.parametrize("chip,value_block,dtype,chunk,t,dk,dv,seen", _CASES)
def test_forward_and_vjp_match_xla(key, kernel_on, chip, value_block, dtype, chunk, t, dk,
                                   dv, seen):
  kernel_on(chip, value_block)
  inputs, state = _inputs(key, 2, t + (seen or 0), 2, dk, dv, dtype)
  if seen is None:  # No initial state: the sequence starts at a chunk start.
    names, args = tuple(inputs), tuple(inputs.values())
    call = lambda implementation, *args: _run(implementation, chunk, dict(zip(names, args)),
                                              None)
  else:
    names, args, call = _with_state(inputs, state, seen, chunk)
  _compare(call, args, names, dtype, key)


def _with_state(inputs, state, seen, chunk):
  """`(names, args, call)` differentiating the initial state's arrays too."""
  if seen:
    state = _midway(state, inputs, seen, chunk)
    inputs = {n: x[:, seen:] for n, x in inputs.items()}
  names = tuple(inputs) + _STATE_FIELDS
  args = tuple(inputs.values()) + tuple(getattr(state, n)[0] for n in _STATE_FIELDS)

  def call(implementation, *args):
    given = dict(zip(names, args))
    start = state._replace(**{n: (given[n],) for n in _STATE_FIELDS})
    return _run(implementation, chunk, {n: given[n] for n in inputs}, start)
  return names, args, call


def _compare(call, args, names, dtype, key):
  """pallas against xla: outputs, final state and the vjp of every argument."""
  # Jitted: the interpreted kernel runs far faster compiled than op by op.
  (y, final), pullback = jax.vjp(jax.jit(functools.partial(call, "pallas")), *args)
  (y_ref, final_ref), pullback_ref = jax.vjp(jax.jit(functools.partial(call, "xla")), *args)
  rtol, grad_rtol = RTOL[dtype], GRAD_RTOL[dtype]
  assert y.dtype == dtype and y.shape == y_ref.shape
  assert_close(y, y_ref, rtol, "y")
  for name, got, want in zip(_STATE_FIELDS, final, final_ref):
    assert got.dtype == jnp.float32
    assert_close(got, want, rtol, f"final {name}")

  cotangent = (jax.random.normal(key, y.shape, dtype),
               tuple(jax.random.normal(jax.random.fold_in(key, i), x.shape)
                     for i, x in enumerate(final)))
  for name, got, want in zip(names, pullback(cotangent), pullback_ref(cotangent)):
    assert got.dtype == want.dtype, name
    assert_close(got, want, grad_rtol, f"d{name}")


def test_unsupported_calls_fall_back_or_raise(key):
  inputs, _ = _inputs(key, 1, 8, 1, 64, 64, jnp.float32)
  hidden = titans.init_state((jnp.zeros((1, 64, 128)), jnp.zeros((1, 128, 64))), 1)
  with pytest.raises(ValueError, match="linear memory"):
    ops.neural_memory(**inputs, initial_state=hidden, implementation="pallas")
  with pytest.raises(ValueError, match="loss='l2'"):
    ops.neural_memory(**inputs, rule="moneta", implementation="pallas")
  with pytest.raises(ValueError, match="chunk_size"):
    ops.neural_memory(**inputs, chunk_size=8, implementation="pallas")
  small = {n: x[..., :32] if x.ndim == 4 else x for n, x in inputs.items()}
  with pytest.raises(ValueError, match="head dims"):
    ops.neural_memory(**small, implementation="pallas")
  # On a CPU, None picks the xla path: the same numbers as asking for it.
  y = ops.neural_memory(**inputs, implementation=None)
  np.testing.assert_array_equal(y, ops.neural_memory(**inputs, implementation="xla"))


def test_block_sizes_are_checked(key):
  inputs, state = _inputs(key, 1, 16, 1, 64, 64, jnp.float32)
  flat = lambda x: jnp.moveaxis(x, 1, 2)
  coefficients = {n: jnp.zeros((1, 1, 16, 16) if n == "cw" else (1, 1, 16)) for n in
                  gpu.COEFFICIENTS}
  for blocks, match in [(BlockSizes(chunk=8, value=32), "blocks.chunk"),
                        (BlockSizes(chunk=16, value=48), "blocks.value")]:
    with pytest.raises(ValueError, match=match):
      chunked.memory_loop(gpu, flat(inputs["q"]), flat(inputs["k"]), flat(inputs["v"]),
                          coefficients, state.weights[0], state.momentum[0],
                          state.anchor[0], blocks=blocks, interpret=True)
