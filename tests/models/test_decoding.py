"""DecoderLM decoding: a prefill then one-token steps give the whole sequence's logits for
every mixer (scanned and single blocks) and with PKM FFNs; greedy generation; the mixer
registry's adapter; errors."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from memjax.models import MIXERS, DecoderLM, Mixer, greedy_generate
from tests.conftest import assert_close

T, PREFILL = 9, 4
SMALL = dict(vocab_size=32, d_model=16, num_heads=2, attention_window=3, chunk_size=4,
             pkm_n_keys=4, pkm_knn=4, pkm_heads=2, pkm_k_dim=8)


def _decode_in_pieces(model, variables, tokens, max_length=T):
  """Logits of a prefill of PREFILL tokens and then one token at a time (jitted)."""
  decode = jax.jit(functools.partial(model.apply, method=DecoderLM.decode))
  state = model.apply(variables, tokens.shape[0], max_length, method=DecoderLM.init_state)
  logits, state = decode(variables, tokens[:, :PREFILL], state)
  pieces = [logits]
  for t in range(PREFILL, tokens.shape[1]):
    logits, state = decode(variables, tokens[:, t:t + 1], state)
    pieces.append(logits)
  return jnp.concatenate(pieces, axis=1)


def _check_decoding(key, model):
  tokens = jax.random.randint(key, (2, T), 0, SMALL["vocab_size"])
  variables = model.init(jax.random.fold_in(key, 1), tokens)
  assert_close(_decode_in_pieces(model, variables, tokens), model.apply(variables, tokens),
               1e-5, f"{model.mixers} / {model.ffns}")


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_every_mixer_decodes_like_the_whole_sequence(key, name):
  # Two identical layers: one scanned run, whose states are stacked.
  _check_decoding(key, DecoderLM(mixers=f"{name},{name}", **SMALL))


# A product-key memory selects its top keys: were two candidates' scores within rounding
# (~1e-7) of each other, decoding's rounding could swap them. knn = n_keys leaves one
# selection (of n_keys^2 sums), and scores differ by ~0.1, so a swap is very unlikely.
@pytest.mark.parametrize("shared", [False, True])
def test_pkm_ffns_and_single_blocks_decode_like_the_whole_sequence(key, shared):
  _check_decoding(key, DecoderLM(mixers="gdn,attn,swa", ffns="pkm,mlp,pkm",
                                 pkm_shared_values=shared, **SMALL))


def test_greedy_generate_picks_the_most_likely_tokens(key):
  model = DecoderLM(mixers="gdn,attn,hopfield", ffns="mlp,pkm,mlp", **SMALL)
  prompt = jax.random.randint(key, (2, 5), 0, SMALL["vocab_size"])
  params = model.init(jax.random.fold_in(key, 1), prompt)["params"]
  generated = greedy_generate(model, params, prompt, 4)
  assert generated.shape == (2, 4) and generated.dtype == jnp.int32
  # Teacher-forced logits of prompt + generated: each generated token is (up to rounding,
  # which could break a near tie) the argmax at the position before it.
  logits = model.apply({"params": params}, jnp.concatenate([prompt, generated], axis=1))
  before = logits[:, prompt.shape[1] - 1:-1]
  chosen = jnp.take_along_axis(before, generated[..., None], axis=-1)[..., 0]
  assert jnp.all(chosen >= before.max(axis=-1) - 1e-4)


class _RunningSum(nn.Module):
  """A toy mixer with the model's own init_state signature: y_t = W sum_{s <= t} x_s."""

  def init_state(self, batch_size, dim, max_length):
    del max_length
    return jnp.zeros((batch_size, 1, dim))

  @nn.compact
  def __call__(self, x, state=None):
    sums = jnp.cumsum(x, axis=1) + (0.0 if state is None else state)
    return nn.Dense(x.shape[-1], name="proj")(sums), sums[:, -1:]


def test_a_mixer_with_the_model_signature_registers_in_one_line(key, monkeypatch):
  monkeypatch.setitem(MIXERS, "running_sum", Mixer(lambda s: _RunningSum()))
  _check_decoding(key, DecoderLM(mixers="running_sum,running_sum,gdn", **SMALL))


def test_attention_needs_max_length(key):
  model = DecoderLM(mixers="gdn,attn", **SMALL)
  variables = model.init(key, jnp.zeros((1, 3), jnp.int32))
  with pytest.raises(ValueError, match="needs max_length"):
    model.apply(variables, 1, method=DecoderLM.init_state)


def test_hopfield_needs_max_length(key):
  model = DecoderLM(mixers="hopfield", **SMALL)
  variables = model.init(key, jnp.zeros((1, 3), jnp.int32))
  with pytest.raises(ValueError, match="needs max_length"):
    model.apply(variables, 1, method=DecoderLM.init_state)


def test_bad_decoding_state(key):
  model = DecoderLM(mixers="gdn,attn,attn", **SMALL)
  variables = model.init(key, jnp.zeros((1, 3), jnp.int32))
  state = model.apply(variables, 1, 8, method=DecoderLM.init_state)
  assert len(state) == 2  # layer_0 and the scanned layers_1_2
  with pytest.raises(ValueError, match=r"one entry per layer run \['layer_0', 'layers_1_2'\]"):
    model.apply(variables, jnp.zeros((1, 1), jnp.int32), state[:1], method=DecoderLM.decode)


def test_greedy_generate_bad_arguments(key):
  model = DecoderLM(mixers="gdn", **SMALL)
  params = model.init(key, jnp.zeros((1, 3), jnp.int32))["params"]
  with pytest.raises(ValueError, match="num_tokens must be an int >= 1"):
    greedy_generate(model, params, jnp.zeros((1, 3), jnp.int32), 0)
  with pytest.raises(ValueError, match=r"prompt must be integers \[B, T\]"):
    greedy_generate(model, params, jnp.zeros((3,), jnp.int32), 2)
  with pytest.raises(ValueError, match="max_length=3 cannot hold"):
    greedy_generate(model, params, jnp.zeros((1, 3), jnp.int32), 2, max_length=3)
