"""Every parameter of the memjax modules carries logical axis names of the sharding rules,
one per dimension, and the names lay the parameters out on the test meshes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from memjax import nn as mnn
from memjax import sharding
from memjax.models import MIXERS
from memjax.models import DecoderLM
from memjax.models.summary import SCANNED_RUN
from memjax.train import sharded

_LOGICAL = {name for name, _ in sharding.DEFAULT_RULES}
_MESHES = [{"data": 8}, {"fsdp": 8}, {"data": 2, "model": 4}, {"data": 2, "fsdp": 2, "model": 2}]


def _boxed_leaves(params):
  """(path, leaf) of every parameter, a Flax partitioning box counting as one leaf."""
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
  return jax.tree_util.tree_flatten_with_path(params, is_leaf=is_box)[0]


def _assert_all_named(params):
  leaves = _boxed_leaves(params)
  assert leaves
  for path, leaf in leaves:
    where = jax.tree_util.keystr(path)
    assert isinstance(leaf, nn.LogicallyPartitioned), f"{where} has no logical axis names"
    assert len(leaf.names) == leaf.value.ndim, f"{where}: {leaf.names} for {leaf.value.shape}"
    assert set(leaf.names) <= _LOGICAL | {None}, f"{where}: {leaf.names}"
    scanned = SCANNED_RUN.match(str(path[0].key)) is not None
    assert (leaf.names[0] == "layers") == scanned, f"{where}: {leaf.names}"


# A scanned run of two layers, then one layer of every registered mixer.
_LAYERS = [("gdn", "mlp")] * 2 + [(mixer, "pkm" if i % 3 == 1 else "mlp")
                                  for i, mixer in enumerate(sorted(MIXERS))]


def _every_mixer_model():
  """A DecoderLM of `_LAYERS`, with an untied head."""
  mixers, ffns = zip(*_LAYERS)
  return DecoderLM(vocab_size=64, d_model=32, mixers=",".join(mixers), ffns=",".join(ffns),
                   num_heads=4, head_dim=8, mlp_ratio=2.0, tie_embeddings=False,
                   attention_window=8, chunk_size=8, pkm_n_keys=4, pkm_heads=4, pkm_knn=2,
                   pkm_k_dim=8)


@pytest.fixture(scope="module")
def every_mixer_params():
  tokens = jax.ShapeDtypeStruct((8, 16), jnp.int32)
  return jax.eval_shape(_every_mixer_model().init, jax.random.key(0), tokens)["params"]


def test_every_decoder_parameter_is_named(every_mixer_params):
  names = set(every_mixer_params)
  assert {"embed", "head", "final_norm"} <= names
  assert any(SCANNED_RUN.match(name) for name in names)
  _assert_all_named(every_mixer_params)


def test_shared_product_key_values_are_named():
  model = DecoderLM(vocab_size=64, d_model=32, mixers="gdn,gdn", ffns="pkm", num_heads=4,
                    pkm_n_keys=4, pkm_heads=4, pkm_knn=2, pkm_k_dim=8,
                    pkm_shared_values=True)
  params = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((2, 8), jnp.int32))
  params = params["params"]
  assert params["pkm_values"]["memory_values"].names == ("memory_slots", "embed")
  _assert_all_named(params)


def test_layout_of_the_main_weights(every_mixer_params):
  by_path = {jax.tree_util.keystr(path): leaf.names
             for path, leaf in _boxed_leaves(every_mixer_params)}
  layer = lambda i, rest: by_path[f"['layer_{i}']{rest}"]
  attn = _LAYERS.index(("attn", "mlp"))
  assert layer(attn, "['mixer']['qkv_proj']['kernel']") == ("embed", None, "heads", None)
  assert layer(attn, "['mixer']['out_proj']['kernel']") == ("heads", "embed")
  assert layer(attn, "['ffn']['gate_proj']['kernel']") == ("embed", "mlp")
  assert layer(attn, "['ffn']['down_proj']['kernel']") == ("mlp", "embed")
  pkm = [ffn for _, ffn in _LAYERS].index("pkm")
  assert layer(pkm, "['ffn']['values']['memory_values']") == ("memory_slots", "embed")
  assert by_path["['layers_0_1']['mixer']['q_proj']['kernel']"] == ("layers", "embed", "heads")
  assert by_path["['embed']['embedding']"] == (None, "embed")
  assert by_path["['head']['kernel']"] == ("embed", None)


@pytest.mark.parametrize("shape", _MESHES, ids=str)
def test_every_mixer_lays_out_on_the_test_meshes(every_mixer_params, shape):
  mesh = sharding.make_mesh(shape)
  shardings = sharded.param_shardings(every_mixer_params, mesh, sharding.DEFAULT_RULES)
  assert (jax.tree.structure(shardings)
          == jax.tree.structure(nn.unbox(every_mixer_params)))


_X = jax.ShapeDtypeStruct((2, 8, 32), jnp.float32)

_MODULES = {
    "linear_attention_decay": (mnn.LinearAttention(num_heads=4, head_dim=8, use_decay=True),
                               _X),
    "neural_memory_yaad": (mnn.NeuralMemory(num_heads=4, head_dim=8, rule="yaad",
                                            num_persistent_tokens=2, chunk_size=8), _X),
    "hopfield_all_parameters": (mnn.Hopfield(
        num_heads=4, concat_bias_pattern=True, scaling_trainable=True, normalizer="entmax",
        alpha_trainable=True, normalize_hopfield_space=True,
        normalize_hopfield_space_affine=True), _X),
    "hopfield_pooling": (mnn.HopfieldPooling(num_heads=4, quantity=3), _X),
    "hopfield_layer": (mnn.HopfieldLayer(num_heads=4, quantity=5,
                                         lookup_weights_as_separated=True), _X),
    "pkm_batch_norm": (mnn.ProductKeyMemory(n_keys=4, heads=4, knn=2, k_dim=8,
                                            query_norm="batch"), _X),
    "pkm_layer_norm_unprojected": (mnn.ProductKeyMemory(n_keys=4, heads=4, knn=2, k_dim=8,
                                                        query_norm="layer", swilu=False,
                                                        v_dim=16), _X),
}


@pytest.mark.parametrize("name", sorted(_MODULES))
def test_module_parameters_are_named(name):
  module, x = _MODULES[name]
  variables = jax.eval_shape(module.init, jax.random.key(0), x)
  for path, leaf in _boxed_leaves(variables["params"]):
    where = f"{name}{jax.tree_util.keystr(path)}"
    assert isinstance(leaf, nn.LogicallyPartitioned), f"{where} has no logical axis names"
    assert len(leaf.names) == leaf.value.ndim, f"{where}: {leaf.names}"
    assert set(leaf.names) <= _LOGICAL | {None}, f"{where}: {leaf.names}"


def test_boxed_and_unboxed_parameters_give_the_same_outputs(key):
  # A scanned run: nn.scan takes the layer axis out of the boxes it is given.
  model = DecoderLM(vocab_size=32, d_model=16, mixers="linear,linear", num_heads=2,
                    chunk_size=8)
  tokens = jax.random.randint(key, (2, 8), 0, 32)
  boxed = jax.jit(model.init)(key, tokens)
  plain = nn.unbox(boxed)
  assert not any(isinstance(leaf, nn.LogicallyPartitioned) for _, leaf in
                 _boxed_leaves(plain["params"]))
  apply = jax.jit(model.apply)
  assert jnp.array_equal(apply(boxed, tokens), apply(plain, tokens))
