"""Titans MAC, MAG and MAL: causal, decoding equals the whole sequence, information past the
attention's span flows only through the memory (and, in MAG, from the persistent tokens),
gradients reach every parameter, and bad input gets a clear error."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax import nn as mnn
from tests.conftest import assert_close
from tests.conftest import relative_error

_COMMON = dict(num_heads=2, head_dim=4, num_persistent_tokens=2, memory_expansion=2.0,
               chunk_size=3)
# T = 11 is no multiple of the segment (4) or the memory chunk (3); the window (3) is
# shorter than the sequence, so the sliding window really slides.
LAYERS = {
    "mac": lambda: mnn.TitansMAC(segment_size=4, **_COMMON),
    "mag": lambda: mnn.TitansMAG(window=3, **_COMMON),
    "mal": lambda: mnn.TitansMAL(window=3, **_COMMON),
}
_B, _T, _D = 2, 11, 8


@functools.lru_cache(maxsize=None)
def _compiled(name):
  """The layer and its jitted apply / init_state, compiled once per layer for all tests."""
  layer = LAYERS[name]()
  start = jax.jit(functools.partial(layer.apply, method="init_state"), static_argnums=(1, 2))
  return layer, jax.jit(layer.apply), start


def _setup(name, key):
  layer, apply, start = _compiled(name)
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
  x = jnp.asarray(rng.standard_normal((_B, _T, _D)), jnp.float32)
  # Unboxed: the tests below read and replace parameters by name.
  params = nn.meta.unbox(jax.jit(layer.init)(jax.random.fold_in(key, 1), x))
  return layer, apply, start, params, x


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_decode_and_prefill_equal_full_sequence(name, key):
  _, apply, start, params, x = _setup(name, key)
  y, final = apply(params, x)
  assert y.shape == x.shape
  # Token by token from the start, and a prefill of 6 tokens (for MAC: a segment and a
  # half, so decoding resumes inside a segment) followed by one-token steps.
  for prefill in (0, 6):
    if prefill:
      y_pre, state = apply(params, x[:, :prefill])
      ys = [y_pre]
    else:
      state, ys = start(params, _B, _D), []
    for t in range(prefill, _T):
      y_t, state = apply(params, x[:, t:t + 1], state)
      ys.append(y_t)
    assert_close(jnp.concatenate(ys, 1), y, 1e-4, f"outputs after a prefill of {prefill}")
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(final)):
      assert_close(got, want, 1e-4, f"state after a prefill of {prefill}")


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_causal(name, key):
  _, apply, _, params, x = _setup(name, key)
  y, _ = apply(params, x)
  cut = 6
  bump = jax.random.normal(jax.random.fold_in(key, 2), (_B, _T - cut, _D))
  y_bumped, _ = apply(params, x.at[:, cut:].add(bump))
  assert_close(y_bumped[:, :cut], y[:, :cut], 1e-6, "outputs before the changed tokens")
  assert relative_error(y_bumped[:, cut:], y[:, cut:]) > 1e-2
  # A prefix alone (T < segment_size for MAC) gives the prefix of the outputs.
  y_short, _ = jax.jit(_compiled(name)[0].apply)(params, x[:, :3])
  assert_close(y_short, y[:, :3], 1e-5, "outputs of a prefix")


def _without_learning(params):
  """The memory with theta = alpha = 0: it keeps its initial weights whatever it reads."""
  def freeze(path, leaf):
    where = jax.tree_util.keystr(path)
    gate = "['theta_gate']" in where or "['alpha_gate']" in where
    return jnp.full_like(leaf, -1e4) if gate and where.endswith("['up']['bias']") else leaf
  return jax.tree_util.tree_map_with_path(freeze, params)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_only_the_memory_reaches_past_the_attention_span(name, key):
  _, apply, _, params, x = _setup(name, key)
  x_bumped = x.at[:, 0].add(3.0 * jax.random.normal(jax.random.fold_in(key, 2), (_B, _D)))
  # From t = 8 on, token 0 is outside every attention span (MAC: two segments on; MAG and
  # MAL: the window of 3 plus the memory's short convolutions of 4).
  far = slice(8, None)
  frozen = _without_learning(params)
  assert_close(apply(frozen, x_bumped)[0][:, far], apply(frozen, x)[0][:, far], 1e-6,
               "far outputs of a memory that does not learn")
  assert relative_error(apply(params, x_bumped)[0][:, far], apply(params, x)[0][:, far]) > 1e-4


@pytest.mark.parametrize("name", ["mag", "mal"])
def test_persistent_tokens_reach_past_the_window_only_in_mag(name, key):
  """MAG's SW-Attn* keeps the persistent tokens visible to every token; MAL's SW-Attn lets
  them leave the window. With a memory that does not learn, the attention is the only path
  from them to the last output, far outside the window of 3."""
  layer, _, _, params, x = _setup(name, key)
  frozen = _without_learning(params)
  cotangent = jax.random.normal(jax.random.fold_in(key, 2), (_B, _D))

  def first_and_last(tokens):
    p = {"params": {**frozen["params"], "persistent": {"tokens": tokens}}}
    y = layer.apply(p, x)[0]
    return jnp.vdot(cotangent, y[:, 0]), jnp.vdot(cotangent, y[:, -1])

  tokens = frozen["params"]["persistent"]["tokens"]
  near, far = (np.linalg.norm(g) for g in jax.jit(jax.jacrev(first_and_last))(tokens))
  assert near > 0
  if name == "mag":
    assert far > 1e-3 * near, (far, near)
  else:
    assert far == 0, far


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_gradients_reach_every_parameter(name, key):
  layer, _, _, params, x = _setup(name, key)
  loss = lambda p: jnp.sum(layer.apply(p, x)[0] ** 2)
  grads = jax.jit(jax.grad(loss))(params)
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  names = {jax.tree_util.keystr(path) for path, _ in flat}
  # The memory's weights and gates, the attention and the persistent tokens are all there.
  for part in ("memory_w0", "theta_gate", "attention", "persistent"):
    assert any(part in n for n in names), (part, sorted(names))
  for path, g in flat:
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), jax.tree_util.keystr(path)
    assert np.linalg.norm(g) > 0, jax.tree_util.keystr(path)


def test_bad_input():
  x = jnp.zeros((2, 5, 8))
  layer = mnn.TitansMAC(num_heads=2, head_dim=4, segment_size=4)
  params = jax.jit(layer.init)(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"x must have shape \[B, T, D\].*\(2, 5\)"):
    layer.apply(params, jnp.zeros((2, 5)))
  with pytest.raises(ValueError, match=r"D = 8.*\(2, 5, 6\)"):
    layer.apply(params, jnp.zeros((2, 5, 6)))
  with pytest.raises(ValueError, match="floating dtype"):
    layer.apply(params, jnp.zeros((2, 5, 8), jnp.int32))
  state = layer.apply(params, 3, 8, method="init_state")
  with pytest.raises(ValueError, match=r"B = 2 .*\(3, 2, 4, 16\)"):
    layer.apply(params, x, state)
  mag = mnn.TitansMAG(num_heads=2, head_dim=4, window=3)
  with pytest.raises(ValueError, match="state must be a TitansState"):
    mag.apply(jax.jit(mag.init)(jax.random.key(0), x), x, state)
  for bad, match in ((mnn.TitansMAC(segment_size=0), "segment_size"),
                     (mnn.TitansMAL(window=0), "window"),
                     (mnn.TitansMAG(num_persistent_tokens=-1), "num_persistent_tokens"),
                     (mnn.TitansMAC(head_dim=3), "head_dim")):
    with pytest.raises(ValueError, match=match):
      jax.eval_shape(bad.init, jax.random.key(0), x)
