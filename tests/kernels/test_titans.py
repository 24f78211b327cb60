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
from memjax.kernels.titans import mlp_common
from memjax.ops import dispatch
from memjax.ops import titans
from tests.conftest import GRAD_RTOL, RTOL, assert_close

_INTERPRET = {"gpu": True, "tpu": compat.tpu_interpret()}
_STATE_FIELDS = ("weights", "momentum", "anchor")


def _inputs(key, b, t, h, dk, dv, dtype, hidden=None, max_alpha=0.2):
  """q, k (unit norm), v in `dtype`; theta in (0, 0.2), eta in (0, 1), alpha in
  (0, max_alpha); a random state of the linear memory, or with `hidden` of the two-layer
  MLP memory (dk == dv).

  Over hundreds of tokens, forgetting at alpha ~ 0.1 shrinks the MLP memory's weights until
  its LayerNormed outputs are mostly rounding: 1e-3 relative noise on the inputs then moves
  them by 8% at T = 533. Long comparisons take a smaller `max_alpha`, which keeps the
  weights, and the comparison meaningful (0.3% there at max_alpha = 0.02)."""
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  gate = lambda: 1 / (1 + np.exp(-normal(b, t, h)))
  k = normal(b, t, h, dk)
  arrays = dict(q=normal(b, t, h, dk), k=k / np.linalg.norm(k, axis=-1, keepdims=True),
                v=normal(b, t, h, dv))
  inputs = {n: jnp.asarray(x, dtype) for n, x in arrays.items()}
  inputs.update(theta=jnp.asarray(0.2 * gate()), eta=jnp.asarray(gate()),
                alpha=jnp.asarray(max_alpha * gate()))
  if hidden is None:
    weights = (jnp.asarray(0.5 * normal(h, dk, dv)),)
  else:
    weights = (jnp.asarray(normal(h, dk, hidden) / np.sqrt(dk)),
               jnp.asarray(normal(h, hidden, dv) / np.sqrt(hidden)))
  return inputs, titans.init_state(weights, b)


def _midway(state, inputs, tokens, chunk):
  """The state after the first `tokens` tokens (by the xla path): part way into a chunk,
  with momentum, and an anchor that differs from the weights."""
  head = {n: x[:, :tokens] for n, x in inputs.items()}
  _, state = jax.jit(functools.partial(
      ops.neural_memory, chunk_size=chunk, return_final_state=True, implementation="xla"))(
          **head, initial_state=state)
  assert int(state.position) == tokens % chunk
  return state


def _run(implementation, chunk, inputs, state, activation="gelu"):
  y, final = ops.neural_memory(**inputs, initial_state=state, chunk_size=chunk,
                               return_final_state=True, implementation=implementation,
                               activation=activation)
  return y, tuple(getattr(final, n) for n in _STATE_FIELDS)


@pytest.fixture
def kernel_on(monkeypatch):
  """Routes `implementation="pallas"` to a given chip's kernel body and block sizes."""
  def use(chip, value_block=None):
    monkeypatch.setattr(chunked, "on_default_backend", functools.partial(
        chunked.chunk_loop, platform=chip, interpret=_INTERPRET[chip],
        value_block=value_block))
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


# The MLP memory's kernels (one program per head). T never a multiple of the chunk; hidden
# widths 1x, 2x and 4x of K; a state part way into a chunk; three layers once.
_MLP_CASES = [
    # chip, dtype, chunk, T, K, hidden, layers, activation, tokens seen before
    ("gpu", jnp.float32, 16, 37, 64, 128, 2, "gelu", 0),
    ("gpu", jnp.bfloat16, 32, 45, 64, 64, 2, "silu", 7),
    ("gpu", jnp.float32, 16, 21, 64, 64, 3, "relu", 0),
    ("tpu", jnp.float32, 16, 37, 64, 256, 2, "gelu", 5),
    ("tpu", jnp.bfloat16, 16, 29, 128, 128, 2, "gelu", 0),
]


@pytest.mark.parametrize("chip,dtype,chunk,t,dk,hidden,layers,activation,seen", _MLP_CASES)
def test_mlp_memory_forward_and_vjp_match_xla(key, kernel_on, chip, dtype, chunk, t, dk,
                                              hidden, layers, activation, seen):
  kernel_on(chip)
  inputs, state = _inputs(key, 2, t + seen, 2, dk, dk, dtype, hidden=hidden)
  if layers == 3:  # K -> hidden -> hidden -> K.
    extra = jax.random.normal(jax.random.fold_in(key, 3), (2, hidden, hidden)) / hidden ** 0.5
    first, last = (w[0] for w in state.weights)
    state = titans.init_state((first, extra, last), 2)
  names, args, call = _with_state(inputs, state, seen, chunk)
  call_with = lambda implementation, *args: call(implementation, *args, activation=activation)
  _compare(call_with, args, names, dtype, key)


def _with_state(inputs, state, seen, chunk):
  """`(names, args, call)` differentiating the initial state's arrays too."""
  if seen:
    state = _midway(state, inputs, seen, chunk)
    inputs = {n: x[:, seen:] for n, x in inputs.items()}
  depth = len(state.weights)
  layers = tuple(f"{n}[{i}]" for n in _STATE_FIELDS for i in range(depth))
  names = tuple(inputs) + layers
  args = tuple(inputs.values()) + tuple(x for n in _STATE_FIELDS for x in getattr(state, n))

  def call(implementation, *args, activation="gelu"):
    given = dict(zip(names, args))
    start = state._replace(**{n: tuple(given[f"{n}[{i}]"] for i in range(depth))
                              for n in _STATE_FIELDS})
    return _run(implementation, chunk, {n: given[n] for n in inputs}, start, activation)
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
    for i, (layer, layer_ref) in enumerate(zip(got, want)):
      assert layer.dtype == jnp.float32
      assert_close(layer, layer_ref, rtol, f"final {name}[{i}]")

  leaves, tree = jax.tree.flatten(final)
  cotangent = (jax.random.normal(key, y.shape, dtype),
               jax.tree.unflatten(tree, [jax.random.normal(jax.random.fold_in(key, i), x.shape)
                                         for i, x in enumerate(leaves)]))
  for name, got, want in zip(names, pullback(cotangent), pullback_ref(cotangent)):
    assert got.dtype == want.dtype, name
    assert_close(got, want, grad_rtol, f"d{name}")


def test_unsupported_calls_fall_back_or_raise(key):
  inputs, _ = _inputs(key, 1, 8, 1, 64, 64, jnp.float32)
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


def test_mlp_memory_kernel_runs_only_when_asked_for(key, monkeypatch):
  inputs, state = _inputs(key, 1, 8, 1, 64, 64, jnp.float32, hidden=128)
  _, odd_width = _inputs(key, 1, 8, 1, 64, 64, jnp.float32, hidden=48)
  with pytest.raises(ValueError, match="power-of-two hidden width"):
    ops.neural_memory(**inputs, initial_state=odd_width, implementation="pallas")
  # As on a GPU or TPU: None keeps the MLP memory on the xla form (its kernels are not yet
  # timed on a chip), while the linear memory gets its kernel.
  monkeypatch.setattr(dispatch, "pallas_compiles", lambda: True)
  kernel_layers = []

  def kernel(q, k, v, coefficients, weights0, *state, **options):
    kernel_layers.append(len(weights0))
    return chunked.chunk_loop(q, k, v, coefficients, weights0, *state, platform="gpu",
                              interpret=True, **options)
  monkeypatch.setattr(chunked, "on_default_backend", kernel)
  y = ops.neural_memory(**inputs, initial_state=state)
  np.testing.assert_array_equal(
      y, ops.neural_memory(**inputs, initial_state=state, implementation="xla"))
  assert not kernel_layers
  ops.neural_memory(**inputs)
  assert kernel_layers == [1]


def test_mlp_memory_gpu_kernel_refuses_states_larger_than_it_compiled_with(monkeypatch):
  k, depth = 64, 2
  q = lambda dtype: jnp.zeros((1, 8, 1, k), dtype)
  why = lambda dtype, hidden: mlp_common.unsupported(q(dtype), q(dtype), depth, hidden, "l2",
                                                     "l2", 64)
  assert mlp_common.state_bytes(k, 256, depth) == 384 * 1024
  assert why(jnp.float32, 256) is None  # Interpreted on the CPU: no on-chip limit.
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert "384 KiB of state per head" in why(jnp.bfloat16, 256)
  assert "96 KiB of state per head" in why(jnp.float32, 64)
  assert why(jnp.bfloat16, 64) is None


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
