"""DecoderLM: builds from every mixer and FFN spec, is causal, stacks identical layers with
nn.scan (same outputs as unstacked), shares PKM tables on request, rejects bad specs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from memjax.models import FFNS, MIXERS, DecoderLM, parse_ffns, parse_mixers
from tests.conftest import assert_close

SMALL = dict(vocab_size=50, d_model=32, num_heads=2, attention_window=4, chunk_size=8,
             pkm_n_keys=4, pkm_knn=4, pkm_heads=2, pkm_k_dim=8)


@pytest.mark.parametrize("spec, ffns", [
    ("gdn,gdn", "mlp"), ("gdn,attn", "pkm"), ("linear,deltanet,swa", "mlp,pkm,mlp"),
    ("mom,lmm,hopfield", "mlp")])
@pytest.mark.parametrize("tie", [True, False])
def test_builds_and_is_causal(key, spec, ffns, tie):
  model = DecoderLM(mixers=spec, ffns=ffns, tie_embeddings=tie, **SMALL)
  tokens = jax.random.randint(key, (2, 19), 0, 50)
  params = model.init(jax.random.fold_in(key, 1), tokens)["params"]
  assert ("head" in params) != tie
  logits = model.apply({"params": params}, tokens)
  assert logits.shape == (2, 19, 50) and logits.dtype == jnp.float32
  assert jnp.all(jnp.isfinite(logits))
  changed = model.apply({"params": params}, tokens.at[:, 12].set((tokens[:, 12] + 1) % 50))
  assert jnp.allclose(changed[:, :12], logits[:, :12], atol=1e-5)
  assert not jnp.allclose(changed[:, 12:], logits[:, 12:], atol=1e-5)


def test_uniform_model_is_one_scanned_block_with_a_layer_axis(key):
  model = DecoderLM(mixers=",".join(["gdn"] * 8), **SMALL)
  shapes = jax.eval_shape(model.init, key, jnp.zeros((1, 4), jnp.int32))["params"]
  assert set(shapes) == {"embed", "layers_0_7", "final_norm"}
  leaves = jax.tree.leaves(shapes["layers_0_7"])
  assert leaves and all(leaf.shape[0] == 8 for leaf in leaves)


def test_runs_of_identical_layers_are_scanned(key):
  model = DecoderLM(mixers="gdn,gdn,attn,attn,attn,gdn", ffns="mlp,mlp,mlp,pkm,pkm,mlp",
                    **SMALL)
  shapes = jax.eval_shape(model.init, key, jnp.zeros((1, 4), jnp.int32))["params"]
  assert set(shapes) == {"embed", "layers_0_1", "layer_2", "layers_3_4", "layer_5",
                         "final_norm"}


def _unstack(params):
  """Scanned params -> the unscanned layout: `layers_a_b` becomes `layer_a` ... `layer_b`."""
  out = {}
  for name, sub in nn.meta.unbox(params).items():
    if name.startswith("layers_"):
      first, last = map(int, name.split("_")[1:])
      for i in range(first, last + 1):
        out[f"layer_{i}"] = jax.tree.map(lambda a, i=i: a[i - first], sub)
    else:
      out[name] = sub
  return out


@pytest.mark.parametrize("spec, ffns", [("gdn,gdn,gdn,attn,attn", "mlp,mlp,mlp,pkm,pkm"),
                                        ("hopfield,hopfield,lmm,lmm", "mlp")])
def test_scanned_equals_unscanned_for_equal_params(key, spec, ffns):
  scanned = DecoderLM(mixers=spec, ffns=ffns, **SMALL)
  unscanned = scanned.clone(scan_layers=False)
  tokens = jax.random.randint(key, (2, 11), 0, 50)
  params = scanned.init(jax.random.fold_in(key, 1), tokens)["params"]
  flat = _unstack(params)
  want = jax.eval_shape(unscanned.init, key, tokens)["params"]
  assert jax.tree.structure(nn.meta.unbox(want)) == jax.tree.structure(flat)
  assert_close(unscanned.apply({"params": flat}, tokens),
               scanned.apply({"params": params}, tokens), 1e-5)


@pytest.mark.parametrize("spec", ["lmm", "lmm_linear", "titans_mac", "titans_mag", "titans_mal"])
def test_memory_learning_rate_reaches_the_memory(key, spec):
  """Same parameters, another ceiling of theta: other outputs (the memory learns more)."""
  model = DecoderLM(mixers=spec, **SMALL)
  tokens = jax.random.randint(key, (2, 19), 0, 50)
  params = model.init(jax.random.fold_in(key, 1), tokens)["params"]
  default = model.apply({"params": params}, tokens)
  faster = model.clone(memory_learning_rate=0.5).apply({"params": params}, tokens)
  assert float(jnp.abs(faster - default).max()) > 1e-4


def test_shared_pkm_values_are_one_table(key):
  model = DecoderLM(mixers="gdn,gdn,gdn,gdn,gdn", ffns="pkm,pkm,mlp,mlp,pkm",
                    pkm_shared_values=True, **SMALL)
  tokens = jax.random.randint(key, (2, 7), 0, 50)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.fold_in(key, 1), tokens)["params"])
  assert params["pkm_values"]["memory_values"].shape == (4 ** 2, 32)
  # The pkm layers are single modules (a scan would copy the table), none with its own
  # table; the mlp layers are still scanned.
  assert set(params) == {"embed", "layer_0", "layer_1", "layers_2_3", "layer_4",
                         "pkm_values", "final_norm"}
  assert all("values" not in params[f"layer_{i}"]["ffn"] for i in (0, 1, 4))
  grad = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, tokens) ** 2)))(params)
  assert jnp.any(grad["pkm_values"]["memory_values"] != 0)


def test_every_name_parses():
  assert parse_mixers(",".join(MIXERS)) == tuple(MIXERS)
  assert parse_ffns(",".join(FFNS), len(FFNS)) == tuple(FFNS)
  assert parse_ffns("pkm", 3) == ("pkm",) * 3


@pytest.mark.parametrize("spec", ["", "gdn,,attn", "gdn,mamba"])
def test_bad_mixer_specs_list_the_valid_names(spec):
  with pytest.raises(ValueError, match="attn.*deltanet.*gdn.*hopfield"):
    parse_mixers(spec)


@pytest.mark.parametrize("spec", ["", "mlp,,pkm", "mlp,moe"])
def test_bad_ffn_specs_list_the_valid_names(spec):
  with pytest.raises(ValueError, match=r"\['mlp', 'pkm'\]"):
    parse_ffns(spec, 3)


def test_ffn_list_must_match_the_layers():
  model = DecoderLM(vocab_size=10, d_model=16, mixers="gdn,gdn,gdn", ffns="mlp,pkm")
  with pytest.raises(ValueError, match="names 2 layers, but the model has 3"):
    model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


def test_sliding_window_needs_a_window():
  model = DecoderLM(vocab_size=10, d_model=16, mixers="swa", num_heads=2)
  with pytest.raises(ValueError, match="attention_window"):
    model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


def test_bad_tokens():
  model = DecoderLM(vocab_size=10, d_model=16, mixers="gdn", num_heads=2)
  with pytest.raises(ValueError, match=r"tokens must be integers \[B, T\]"):
    model.init(jax.random.key(0), jnp.zeros((1, 4, 2), jnp.int32))
