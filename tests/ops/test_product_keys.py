"""product_key_topk and weighted_value_lookup: product search equals brute force over all
n_keys ** 2 keys, the lookup equals a dense one-hot read, gradients, and argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax import ops
from tests.conftest import assert_close

# Jitted: one compilation per shape instead of one per primitive in eager mode.
topk = jax.jit(ops.product_key_topk, static_argnames=("knn", "implementation"))
lookup = jax.jit(ops.weighted_value_lookup)


def _rng(key):
  """A numpy generator seeded by `key`: on a CPU each jax.random sampler shape compiles for
  seconds."""
  return np.random.default_rng(np.asarray(jax.random.key_data(key)))


def _normal(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _inputs(key, lead, heads, k_dim, n_keys):
  rng = _rng(key)
  return _normal(rng, *lead, heads, k_dim), _normal(rng, heads, 2, n_keys, k_dim // 2)


def _brute_force_numpy(query, sub_keys, knn):
  """Scores every product key (a, b) as [q1, q2] . [C1[a], C2[b]] in float64; top knn."""
  q = np.asarray(query, np.float64)
  c = np.asarray(sub_keys, np.float64)
  heads, _, n_keys, half = c.shape
  full_keys = np.concatenate([np.repeat(c[:, 0], n_keys, axis=1),   # C1[a] at a * n + b
                              np.tile(c[:, 1], (1, n_keys, 1))], -1)  # C2[b] at a * n + b
  assert full_keys.shape == (heads, n_keys * n_keys, 2 * half)
  scores = np.einsum("...hk,hnk->...hn", q, full_keys)
  order = np.argsort(-scores, axis=-1)[..., :knn]
  return np.take_along_axis(scores, order, -1), order


@pytest.mark.parametrize("implementation", ["xla", "reference"])
@pytest.mark.parametrize("lead,heads,k_dim,n_keys,knn", [
    ((2, 7), 3, 8, 16, 5), ((4,), 1, 4, 9, 9)])
def test_topk_equals_brute_force_over_all_keys(key, implementation, lead, heads, k_dim,
                                               n_keys, knn):
  query, sub_keys = _inputs(key, lead, heads, k_dim, n_keys)
  scores, indices = topk(query, sub_keys, knn=knn, implementation=implementation)
  want_scores, want_indices = _brute_force_numpy(query, sub_keys, knn)
  assert scores.shape == indices.shape == (*lead, heads, knn)
  assert scores.dtype == jnp.float32 and indices.dtype == jnp.int32
  np.testing.assert_array_equal(indices, want_indices)
  assert_close(scores, want_scores, 1e-5, "scores")


def test_bf16_query_selects_like_its_float32_copy(key):
  query, sub_keys = _inputs(key, (3, 5), 2, 8, 10)
  query = query.astype(jnp.bfloat16)
  _, indices = topk(query, sub_keys, knn=4, implementation="xla")
  _, want = _brute_force_numpy(query.astype(jnp.float32), sub_keys, 4)
  np.testing.assert_array_equal(indices, want)


def test_topk_gradients_agree_with_brute_force(key):
  query, sub_keys = _inputs(key, (2, 5), 2, 8, 12)
  weights = _normal(_rng(jax.random.fold_in(key, 1)), 2, 5, 2, 4)

  def loss(impl):
    return lambda q, c: jnp.sum(ops.product_key_topk(q, c, 4, implementation=impl)[0] * weights)

  grads = jax.jit(jax.grad(loss("xla"), argnums=(0, 1)))(query, sub_keys)
  ref_grads = jax.jit(jax.grad(loss("reference"), argnums=(0, 1)))(query, sub_keys)
  for name, g, r in zip(("query", "sub_keys"), grads, ref_grads):
    assert float(jnp.abs(g).max()) > 0, f"no gradient reaches {name}"
    assert_close(g, r, 1e-5, name)


def test_lookup_equals_dense_one_hot_read(key):
  rng = _rng(key)
  values, weights = _normal(rng, 50, 6), _normal(rng, 3, 4, 7)
  indices = jnp.asarray(rng.integers(0, 50, (3, 4, 7)), jnp.int32)
  out = lookup(values, indices, weights)
  one_hot = np.eye(50)[np.asarray(indices)]  # [3, 4, 7, 50]: only affordable in a test.
  dense = np.einsum("abl,abln,nv->abv", np.asarray(weights, np.float64), one_hot,
                    np.asarray(values, np.float64))
  assert out.shape == (3, 4, 6) and out.dtype == jnp.float32
  assert_close(out, dense, 1e-6, "lookup")


def test_lookup_gradient_reaches_only_selected_rows(key):
  rng = _rng(key)
  values = _normal(rng, 20, 3)
  indices = jnp.array([[2, 5, 5], [7, 2, 11]])
  weights = jnp.asarray(rng.uniform(0.1, 1.0, (2, 3)), jnp.float32)
  g_values, g_weights = jax.jit(jax.grad(
      lambda v, w: jnp.sum(ops.weighted_value_lookup(v, indices, w)), argnums=(0, 1)))(
          values, weights)
  # Row r's gradient is the sum of the weights that selected it (a scatter-add).
  want = np.zeros(20)
  np.add.at(want, np.asarray(indices).ravel(), np.asarray(weights).ravel())
  assert_close(g_values, np.repeat(want[:, None], 3, 1), 1e-6, "values gradient")
  assert_close(g_weights, np.asarray(values).sum(-1)[np.asarray(indices)], 1e-6, "weights")


@pytest.mark.parametrize("q_shape,c_shape,knn,match", [
    ((2, 3, 7), (3, 2, 8, 3), 2, r"query's last dim K must be even.*\(2, 3, 7\)"),
    ((2, 3, 8), (3, 2, 8, 5), 2,
     r"sub_keys must have shape .*\(3, 2, 8, 4\), got \(3, 2, 8, 5\)"),
    ((2, 3, 8), (2, 2, 8, 4), 2, r"sub_keys must have shape .*\(3, 2, 8, 4\), got \(2, 2, 8, 4\)"),
    ((2, 3, 8), (3, 8, 4), 2,
     r"sub_keys must have shape \[H, 2, n_keys, K // 2\], got \(3, 8, 4\)"),
    ((8,), (1, 2, 8, 4), 2, r"query must have shape \[..., H, K\], got \(8,\)"),
    ((2, 3, 8), (3, 2, 8, 4), 9, r"knn must be an int in \[1, n_keys=8\].*got 9"),
    ((2, 3, 8), (3, 2, 8, 4), 0, r"knn must be an int in \[1, n_keys=8\].*got 0"),
])
def test_topk_errors_name_argument_and_shapes(q_shape, c_shape, knn, match):
  with pytest.raises(ValueError, match=match):
    ops.product_key_topk(jnp.zeros(q_shape), jnp.zeros(c_shape), knn)


def test_topk_rejects_unknown_implementation():
  with pytest.raises(ValueError, match="implementation"):
    ops.product_key_topk(jnp.zeros((2, 1, 4)), jnp.zeros((1, 2, 4, 2)), 2,
                         implementation="pallas")


@pytest.mark.parametrize("v_shape,i,w_shape,match", [
    ((10,), jnp.zeros((2, 3), jnp.int32), (2, 3), r"values must have shape \[N, V\], got \(10,\)"),
    ((10, 4), jnp.zeros((2, 3)), (2, 3), r"indices must have an integer dtype.*\(2, 3\)"),
    ((10, 4), jnp.zeros((2, 3), jnp.int32), (2, 4),
     r"weights must have shape \[..., L\] like indices = \(2, 3\), got \(2, 4\)"),
])
def test_lookup_errors_name_argument_and_shapes(v_shape, i, w_shape, match):
  with pytest.raises(ValueError, match=match):
    ops.weighted_value_lookup(jnp.zeros(v_shape), i, jnp.zeros(w_shape))


def test_check_finite_names_the_array():
  query = jnp.zeros((2, 1, 4)).at[1, 0, 2].set(jnp.nan)
  with pytest.raises(ValueError, match=r"query holds non-finite values \(shape \(2, 1, 4\)\)"):
    ops.product_key_topk(query, jnp.zeros((1, 2, 4, 2)), 2, check_finite=True)
