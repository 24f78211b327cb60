"""parameter_summary: its counts add up to the parameter tree's total, per module and per
layer of a scanned run."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.models import DecoderLM, parameter_summary


def _rows(summary):
  """{name (indent kept): (count, per-layer count or None)} from the table."""
  rows = {}
  for line in summary.splitlines()[1:]:
    match = re.match(r"^(\s*\S+).*?\s([\d,]+)(?:\s+([\d,]+))?$", line)
    number = lambda s: None if s is None else int(s.replace(",", ""))
    rows[match.group(1)] = (number(match.group(2)), number(match.group(3)))
  return rows


@pytest.mark.parametrize("shared", [False, True])
def test_counts_add_up_to_the_tree_total(shared):
  model = DecoderLM(vocab_size=40, d_model=16, mixers="gdn,gdn,gdn,attn,hopfield",
                    ffns="mlp,pkm,pkm,mlp,pkm", pkm_shared_values=shared, pkm_n_keys=4,
                    pkm_knn=2, pkm_k_dim=8, tie_embeddings=False)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  total = sum(np.size(leaf) for leaf in jax.tree.leaves(params))
  summary = parameter_summary(params, model=model)
  rows = _rows(summary)
  assert rows["total"][0] == total
  top = {name: count for name, (count, _) in rows.items() if not name.startswith(" ")}
  assert sum(count for name, count in top.items() if name != "total") == total
  assert ("pkm_values" in top) == shared
  # The eval_shape tree (no arrays) gives the same table.
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  assert parameter_summary(shapes["params"], model=model) == summary
  assert "layer_3 (attn + mlp)" in summary


def test_scanned_run_rows_give_per_layer_counts():
  model = DecoderLM(vocab_size=40, d_model=16, mixers="gdn,gdn,gdn")
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  rows = _rows(parameter_summary(params))
  count, per_layer = rows["layers_0_2"]
  assert count == 3 * per_layer == sum(np.size(x) for x in jax.tree.leaves(params["layers_0_2"]))
  children = [v for name, v in rows.items() if name.startswith("  ")]
  assert {"  mixer", "  ffn", "  mixer_norm", "  ffn_norm"} == {
      name for name in rows if name.startswith("  ")}
  assert sum(c for c, _ in children) == count and sum(p for _, p in children) == per_layer


def test_depth():
  model = DecoderLM(vocab_size=40, d_model=16, mixers="gdn")
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  assert not any(line.startswith(" ") for line in parameter_summary(params, depth=1).splitlines())
  assert "q_proj" not in parameter_summary(params)
  assert "\n    q_proj" in parameter_summary(params, depth=3)
  with pytest.raises(ValueError, match="depth must be an int >= 1"):
    parameter_summary(params, depth=0)
