"""CausalHopfield: causal self-association, cached decoding equal to the whole sequence,
clear errors for a missing or overflowing cache."""

import jax
import jax.numpy as jnp
import pytest

from memjax.models import CausalHopfield
from tests.conftest import assert_close

T = 11


def _mixer_and_input(key, normalizer="softmax"):
  mixer = CausalHopfield(num_heads=2, head_dim=8, normalizer=normalizer)
  x = jax.random.normal(key, (2, T, 16))
  params = mixer.init(jax.random.fold_in(key, 1), x)
  return mixer, params, x


@pytest.mark.parametrize("normalizer", ["softmax", "sparsemax"])
def test_is_causal(key, normalizer):
  mixer, params, x = _mixer_and_input(key, normalizer)
  y, none = mixer.apply(params, x)
  assert none is None and y.shape == x.shape
  # A new random token 6 (a constant shift would vanish in the layer norms).
  y2, _ = mixer.apply(params, x.at[:, 6].set(jax.random.normal(jax.random.fold_in(key, 2),
                                                               (2, 16))))
  assert jnp.array_equal(y2[:, :6], y[:, :6])
  scale = jnp.abs(y).max()
  assert jnp.all(jnp.abs(y2[:, 6:] - y[:, 6:]).max(axis=-1) > 1e-4 * scale)


@pytest.mark.parametrize("normalizer", ["softmax", "sparsemax"])
def test_prefill_then_steps_equal_whole_sequence(key, normalizer):
  mixer, params, x = _mixer_and_input(key, normalizer)
  y, _ = mixer.apply(params, x)
  state = mixer.init_state(2, 16, T + 3)
  y_pre, state = mixer.apply(params, x[:, :5], state)
  pieces = [y_pre]
  step = jax.jit(mixer.apply)
  for t in range(5, T):
    y_t, state = step(params, x[:, t:t + 1], state)
    pieces.append(y_t)
  assert int(state.position) == T
  assert_close(jnp.concatenate(pieces, 1), y, 1e-5)


def test_cache_errors(key):
  mixer, params, x = _mixer_and_input(key)
  with pytest.raises(ValueError, match="needs max_length"):
    mixer.init_state(2, 16, None)
  with pytest.raises(ValueError, match="T=11 tokens but the cache holds max_length=4"):
    mixer.apply(params, x, mixer.init_state(2, 16, 4))
  _, state = mixer.apply(params, x[:, :3], mixer.init_state(2, 16, 4))
  with pytest.raises(ValueError, match="after position 3 overflow"):
    mixer.apply(params, x[:, 3:5], state)
  y, _ = jax.jit(mixer.apply)(params, x[:, 3:5], state)
  assert jnp.all(jnp.isfinite(y[:, 0])) and jnp.all(jnp.isnan(y[:, 1]))
  with pytest.raises(ValueError, match=r"state.inputs must have shape \[B, C, D\]"):
    mixer.apply(params, x, mixer.init_state(2, 8, 16))
  with pytest.raises(ValueError, match="must be a HopfieldMixerState"):
    mixer.apply(params, x, (jnp.zeros((2, 16, 16)), jnp.zeros((), jnp.int32)))
