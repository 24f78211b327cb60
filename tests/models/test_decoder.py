"""DecoderLM: builds from every mixer spec, is causal, and rejects bad specs clearly."""

import jax
import jax.numpy as jnp
import pytest

from memjax.models import MIXERS, DecoderLM, parse_mixers


@pytest.mark.parametrize("spec", ["gdn,gdn", "gdn,attn", "linear,deltanet,swa"])
@pytest.mark.parametrize("tie", [True, False])
def test_builds_and_is_causal(key, spec, tie):
  model = DecoderLM(vocab_size=50, d_model=32, mixers=spec, num_heads=2, attention_window=4,
                    tie_embeddings=tie, chunk_size=8)
  tokens = jax.random.randint(key, (2, 19), 0, 50)
  params = model.init(jax.random.fold_in(key, 1), tokens)["params"]
  assert ("head" in params) != tie
  logits = model.apply({"params": params}, tokens)
  assert logits.shape == (2, 19, 50) and logits.dtype == jnp.float32
  assert jnp.all(jnp.isfinite(logits))
  changed = model.apply({"params": params}, tokens.at[:, 12].set((tokens[:, 12] + 1) % 50))
  assert jnp.allclose(changed[:, :12], logits[:, :12], atol=1e-5)
  assert not jnp.allclose(changed[:, 12:], logits[:, 12:], atol=1e-5)


def test_every_mixer_name_parses():
  assert parse_mixers(",".join(MIXERS)) == tuple(MIXERS)


@pytest.mark.parametrize("spec", ["", "gdn,,attn", "gdn,mamba"])
def test_bad_specs_list_the_valid_names(spec):
  with pytest.raises(ValueError, match="attn.*deltanet.*gdn"):
    parse_mixers(spec)


def test_sliding_window_needs_a_window():
  model = DecoderLM(vocab_size=10, d_model=16, mixers="swa", num_heads=2)
  with pytest.raises(ValueError, match="attention_window"):
    model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


def test_bad_tokens():
  model = DecoderLM(vocab_size=10, d_model=16, mixers="gdn", num_heads=2)
  with pytest.raises(ValueError, match=r"tokens must be integers \[B, T\]"):
    model.init(jax.random.key(0), jnp.zeros((1, 4, 2), jnp.int32))
