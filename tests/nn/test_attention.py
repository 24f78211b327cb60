"""CausalSelfAttention: KV-cache decoding equals the whole sequence, for full and
sliding-window attention (with and without a visible prefix), eagerly and under jit; the
prefix-visible window equals a brute-force masked softmax; bad arguments get clear errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax import nn as mnn
from memjax.nn.attention import rotary_embedding
from tests.conftest import assert_close

T = 13


def _layer_and_input(key, window, t=T, num_prefix_tokens=0):
  layer = mnn.CausalSelfAttention(num_heads=2, head_dim=8, window=window,
                                  num_prefix_tokens=num_prefix_tokens)
  x = jax.random.normal(key, (2, t, 16))
  params = layer.init(jax.random.fold_in(key, 1), x)
  return layer, params, x


# Windows: 1 (an empty ring buffer), shorter than the prefill, longer than the sequence.
CASES = [(None, 5), (None, 1), (1, 4), (3, 6), (4, 2), (5, 9), (16, 5)]


@pytest.mark.parametrize("window, prefill", CASES)
def test_prefill_then_steps_equal_whole_sequence(key, window, prefill):
  layer, params, x = _layer_and_input(key, window)
  y, none = layer.apply(params, x)
  assert none is None and y.shape == x.shape
  state = layer.init_state(x.shape[0], max_length=T)
  y_pre, state = layer.apply(params, x[:, :prefill], state)
  ys = [y_pre]
  for t in range(prefill, T):
    y_t, state = layer.apply(params, x[:, t:t + 1], state)
    ys.append(y_t)
  assert int(state.position) == T
  assert_close(jnp.concatenate(ys, 1), y, 1e-5, f"window {window}, prefill {prefill}")


def _reference(params, x, window, num_prefix_tokens):
  """Softmax attention with the mask written out: i sees j <= i with i - j < window or
  j < num_prefix_tokens."""
  b, t, _ = x.shape
  w = nn.meta.unbox(params)["params"]
  qkv = jnp.einsum("btd,dshk->btshk", x, w["qkv_proj"]["kernel"])  # [B, T, 3, H, K]
  positions = jnp.arange(t)
  q, k = (rotary_embedding(qkv[:, :, n], positions) for n in (0, 1))
  visible = np.zeros((t, t), bool)
  for i in range(t):
    for j in range(i + 1):
      visible[i, j] = window is None or i - j < window or j < num_prefix_tokens
  scores = jnp.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(q.shape[-1])
  weights = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
  o = jnp.einsum("bhij,bjhd->bihd", weights, qkv[:, :, 2]).reshape(b, t, -1)
  return o @ w["out_proj"]["kernel"]


# (window, num_prefix_tokens): the prefix shorter than, longer than and as long as the
# sequence; window 1 (only the prefix and the token itself); full attention (no change).
PREFIX_CASES = [(3, 2), (1, 3), (4, 6), (16, 2), (2, 20), (None, 3)]


@pytest.mark.parametrize("window, num_prefix_tokens", PREFIX_CASES)
def test_prefix_window_equals_masked_softmax(key, window, num_prefix_tokens):
  layer, params, x = _layer_and_input(key, window, num_prefix_tokens=num_prefix_tokens)
  y, _ = layer.apply(params, x)
  assert_close(y, _reference(params, x, window, num_prefix_tokens), 1e-5)


# Prefills inside the prefix, just past it, and longer than prefix + window.
@pytest.mark.parametrize("window, num_prefix_tokens, prefill", [
    (3, 2, 1), (3, 2, 3), (3, 2, 9), (1, 3, 7), (4, 6, 4), (4, 6, 12), (16, 2, 5)])
def test_prefix_window_prefill_then_steps_equal_whole_sequence(
    key, window, num_prefix_tokens, prefill):
  layer, params, x = _layer_and_input(key, window, num_prefix_tokens=num_prefix_tokens)
  y, _ = layer.apply(params, x)
  state = layer.init_state(x.shape[0])
  assert state.keys.shape[1] == num_prefix_tokens + window - 1
  y_pre, state = layer.apply(params, x[:, :prefill], state)
  ys = [y_pre]
  for t in range(prefill, T):
    y_t, state = layer.apply(params, x[:, t:t + 1], state)
    ys.append(y_t)
  assert_close(jnp.concatenate(ys, 1), y, 1e-5, f"prefill {prefill}")


@pytest.mark.parametrize("window", [None, 1, 4])
def test_one_token_from_empty_state_equals_first_output(key, window):
  layer, params, x = _layer_and_input(key, window)
  y, _ = layer.apply(params, x)
  y_0, state = layer.apply(params, x[:, :1], layer.init_state(x.shape[0], max_length=3))
  assert_close(y_0, y[:, :1], 1e-5)
  assert int(state.position) == 1


@pytest.mark.parametrize("window, num_prefix_tokens", [(None, 0), (3, 0), (3, 5)])
def test_jitted_pieces_with_traced_position(key, window, num_prefix_tokens):
  layer, params, x = _layer_and_input(key, window, num_prefix_tokens=num_prefix_tokens)
  y, _ = layer.apply(params, x)
  step = jax.jit(layer.apply)
  state, ys = layer.init_state(x.shape[0], max_length=T), []
  # Uneven pieces; equal-length pieces reuse the compiled step with a new position.
  for start, stop in [(0, 4), (4, 8), (8, 12), (12, 13)]:
    y_piece, state = step(params, x[:, start:stop], state)
    ys.append(y_piece)
  assert_close(jnp.concatenate(ys, 1), y, 1e-5)


def test_window_cache_is_window_sized_and_ignores_max_length():
  layer = mnn.CausalSelfAttention(num_heads=2, head_dim=8, window=6)
  state = layer.init_state(3, max_length=1000, dtype=jnp.bfloat16)
  assert state.keys.shape == state.values.shape == (3, 5, 2, 8)
  assert state.keys.dtype == jnp.bfloat16
  assert state.position.dtype == jnp.int32 and state.position.shape == ()


def test_full_attention_needs_max_length():
  layer = mnn.CausalSelfAttention(num_heads=2, head_dim=8)
  with pytest.raises(ValueError, match="needs max_length"):
    layer.init_state(2)
  with pytest.raises(ValueError, match="max_length must be an int >= 1"):
    layer.init_state(2, max_length=0)


def test_bad_window():
  with pytest.raises(ValueError, match="window must be None or an int >= 1"):
    mnn.CausalSelfAttention(num_heads=2, head_dim=8, window=0).init_state(2)


@pytest.mark.parametrize("bad", [-1, 1.0, True])
def test_bad_num_prefix_tokens(bad):
  layer = mnn.CausalSelfAttention(num_heads=2, head_dim=8, window=3, num_prefix_tokens=bad)
  with pytest.raises(ValueError, match=f"num_prefix_tokens must be an int >= 0, got {bad}"):
    layer.init_state(2)
  with pytest.raises(ValueError, match="num_prefix_tokens must be an int >= 0"):
    layer.init(jax.random.key(0), jnp.zeros((2, 3, 16)))


def test_overflow_is_an_error_eagerly_and_nan_under_jit(key):
  layer, params, x = _layer_and_input(key, None, t=6)
  with pytest.raises(ValueError, match="T=6 tokens but the cache holds max_length=4"):
    layer.apply(params, x, layer.init_state(2, max_length=4))
  _, state = layer.apply(params, x[:, :3], layer.init_state(2, max_length=4))
  with pytest.raises(ValueError, match="after position 3 overflow the cache of max_length=4"):
    layer.apply(params, x[:, 3:5], state)
  # Traced position: the token that fits is right, the one past the end is NaN.
  y, _ = jax.jit(layer.apply)(params, x[:, 3:5], state)
  want, _ = layer.apply(params, x[:, :4])
  assert_close(y[:, 0], want[:, 3], 1e-5)
  assert jnp.all(jnp.isnan(y[:, 1]))


@pytest.mark.parametrize("window, bad, match", [
    (None, lambda s: s._replace(keys=s.keys[:1], values=s.values[:1]), r"\(2, 8, 2, 8\)"),
    (4, lambda s: s._replace(keys=jnp.zeros((2, 5, 2, 8))), r"num_prefix_tokens \+ window - 1"),
    (None, lambda s: s._replace(values=jnp.zeros((2, 8, 3, 8))), r"state.values"),
    (None, lambda s: s._replace(position=jnp.zeros((2,), jnp.int32)), "scalar"),
    (None, lambda s: tuple(s), "must be an AttentionState"),
])
def test_bad_state(key, window, bad, match):
  layer, params, x = _layer_and_input(key, window, t=3)
  with pytest.raises(ValueError, match=match):
    layer.apply(params, x, bad(layer.init_state(2, max_length=8)))


def test_bad_input(key):
  layer, params, _ = _layer_and_input(key, None, t=3)
  with pytest.raises(ValueError, match=r"x must have shape \[B, T, D\]"):
    layer.apply(params, jnp.zeros((2, 16)))
