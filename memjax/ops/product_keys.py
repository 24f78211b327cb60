"""Product-key memory: top-k search over `n_keys ** 2` product keys and the value read.

Per "Large Memory Layers with Product Keys" (arXiv 1907.05242, §3.2): each head splits its
query `q = [q1, q2]` in two halves and has two sets of `n_keys` sub-keys `C1, C2` (each of
dim K / 2). The product key `(C1[a], C2[b])` has index `a * n_keys + b` and score
`q1 . C1[a] + q2 . C2[b]`. The best `knn` product keys are among the `knn x knn` pairs of
the best `knn` sub-keys of each half, so the search costs `2 * n_keys + knn ** 2` scores
instead of `n_keys ** 2`.

Layouts: query [..., H, K]; sub_keys [H, 2, n_keys, K // 2]; values [N, V] with
N = n_keys ** 2 rows.
"""

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from memjax.ops import chunking
from memjax.ops import dispatch
from memjax.ops import validation


def _half_scores(query, sub_keys):
  """Scores of each query half against its sub-keys: 2 x [..., H, n_keys] float32."""
  half = sub_keys.shape[-1]
  q = query.astype(jnp.float32)
  keys = sub_keys.astype(jnp.float32)
  precision = chunking.matmul_precision(query.dtype)
  s1 = jnp.einsum("...hd,hnd->...hn", q[..., :half], keys[:, 0], precision=precision)
  s2 = jnp.einsum("...hd,hnd->...hn", q[..., half:], keys[:, 1], precision=precision)
  return s1, s2


def _reference(query, sub_keys, knn):
  """Brute force: scores all `n_keys ** 2` product keys, then takes the top `knn`."""
  n_keys = sub_keys.shape[2]
  s1, s2 = _half_scores(query, sub_keys)
  # all_scores[..., a * n_keys + b] = s1[..., a] + s2[..., b]: the index layout of the table.
  all_scores = (s1[..., :, None] + s2[..., None, :]).reshape(*s1.shape[:-1], n_keys * n_keys)
  return lax.top_k(all_scores, knn)


def _xla(query, sub_keys, knn):
  """Product search: top `knn` per half, then top `knn` of the `knn x knn` sums."""
  n_keys = sub_keys.shape[2]
  s1, s2 = _half_scores(query, sub_keys)
  best1, idx1 = lax.top_k(s1, knn)
  best2, idx2 = lax.top_k(s2, knn)
  pair_scores = (best1[..., :, None] + best2[..., None, :]).reshape(*best1.shape[:-1], knn * knn)
  scores, pair = lax.top_k(pair_scores, knn)
  # pair = i * knn + j names the i-th best of half 1 and the j-th best of half 2.
  a = jnp.take_along_axis(idx1, pair // knn, axis=-1)
  b = jnp.take_along_axis(idx2, pair % knn, axis=-1)
  return scores, a * n_keys + b


_IMPLEMENTATIONS = {"reference": _reference, "xla": _xla}


def product_key_topk(
    query: jax.Array,
    sub_keys: jax.Array,
    knn: int,
    *,
    implementation: Optional[str] = None,
    check_finite: bool = False,
) -> Tuple[jax.Array, jax.Array]:
  """The `knn` best product keys of every query head.

  Args:
    query: queries [..., H, K] with K even (one query per head).
    sub_keys: the two sub-key sets of each head [H, 2, n_keys, K // 2].
    knn: number of keys to select, 1 <= knn <= n_keys.
    implementation: "reference" (brute force over all n_keys ** 2 keys), "xla" (product
      search) or None (fastest available).
    check_finite: raise a ValueError if an input holds NaN or inf (outside jit only); a
      NaN score would otherwise make the selection arbitrary.

  Returns:
    `(scores, indices)`, both [..., H, knn], best first: float32 scores and int32 indices
    `a * n_keys + b` into the n_keys ** 2 rows of the value table.
  """
  if query.ndim < 2:
    raise ValueError(f"query must have shape [..., H, K], got {tuple(query.shape)}")
  validation.check_floating("query", query)
  validation.check_floating("sub_keys", sub_keys)
  heads, k_dim = query.shape[-2:]
  if k_dim % 2:
    raise ValueError(f"query's last dim K must be even (two halves), got shape "
                     f"{tuple(query.shape)}")
  if sub_keys.ndim != 4:
    raise ValueError(f"sub_keys must have shape [H, 2, n_keys, K // 2], got "
                     f"{tuple(sub_keys.shape)}")
  n_keys = sub_keys.shape[2]
  validation.check_shape("sub_keys", sub_keys, (heads, 2, n_keys, k_dim // 2),
                         f"[H, 2, n_keys, K // 2] with H, K of query {tuple(query.shape)}")
  if not isinstance(knn, int) or isinstance(knn, bool) or not 1 <= knn <= n_keys:
    raise ValueError(f"knn must be an int in [1, n_keys={n_keys}] (sub_keys shape "
                     f"{tuple(sub_keys.shape)}), got {knn!r}")
  if check_finite:
    validation.check_all_finite(query=query, sub_keys=sub_keys)
  impl = dispatch.choose("product_key_topk", implementation, _IMPLEMENTATIONS)
  scores, indices = impl(query, sub_keys, knn)
  return scores, indices.astype(jnp.int32)


def weighted_value_lookup(values: jax.Array, indices: jax.Array,
                          weights: jax.Array) -> jax.Array:
  """`sum_i weights[..., i] * values[indices[..., i]]`, as a gather and a weighted sum.

  Only the selected rows are read (no dense one-hot over the table), so the cost is
  `L * V` per output row whatever the table size. The gradient of `values` is a
  scatter-add of the selected rows into a dense [N, V] array (JAX has no sparse
  gradients), so a training step holds one table-sized buffer per table.

  Args:
    values: the value table [N, V].
    indices: integer row indices [..., L] in [0, N) (out-of-range indices are clamped).
    weights: weight of each selected row [..., L].

  Returns:
    The weighted sums [..., V] in the dtype of `values`.
  """
  if values.ndim != 2:
    raise ValueError(f"values must have shape [N, V], got {tuple(values.shape)}")
  validation.check_floating("values", values)
  validation.check_floating("weights", weights)
  if not jnp.issubdtype(indices.dtype, jnp.integer):
    raise ValueError(f"indices must have an integer dtype, got {indices.dtype} "
                     f"(shape {tuple(indices.shape)})")
  if indices.ndim < 1:
    raise ValueError(f"indices must have shape [..., L], got {tuple(indices.shape)}")
  validation.check_shape("weights", weights, indices.shape, "[..., L] like indices")
  rows = jnp.take(values, indices, axis=0, mode="clip")  # [..., L, V]
  out = jnp.einsum("...l,...lv->...v", weights.astype(jnp.float32), rows.astype(jnp.float32),
                   precision=chunking.matmul_precision(values.dtype))
  return out.astype(values.dtype)
