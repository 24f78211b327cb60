"""Product-key memory layer (arXiv 1907.05242) with the options of Memory Layers at Scale
(arXiv 2412.09764).

Per token: a query projection (optionally batch- or layer-normalised) gives one query per
head; each head selects its `knn` best of `n_keys ** 2` product keys
(`memjax.ops.product_key_topk`) and softmaxes their scores; the selected rows of one value
table, shared by the heads, are summed with those weights over all heads
(`memjax.ops.weighted_value_lookup`). With `swilu=True` (Memory Layers at Scale) the read is
gated and projected: `out_proj(read * silu(swilu_proj(x)))`.

Sharing one value table between layers: create one `ProductKeyValues` in the parent module
and pass it as `values=` to each layer. Flax binds a module to the scope it was created
in, so the table's parameter lives once, under the parent, and every layer reads and
trains the same array (its gradient is the sum over the layers):

    table = ProductKeyValues(num_rows=n_keys ** 2, dim=d, name="shared_values")
    x = x + ProductKeyMemory(n_keys=n_keys, values=table, name="pkm_0")(x)
    x = x + ProductKeyMemory(n_keys=n_keys, values=table, name="pkm_1")(x)

The table's parameter is named `VALUES_PARAM` (which `memjax.train.param_groups` uses to
give the values their own learning rate) and carries the logical axes
`("memory_slots", "embed")`, so sharding rules can split its rows over a mesh axis. The
query heads split over "heads" (the query projection [D, H * K], the sub-keys
[H, 2, n_keys, K / 2]); the gated read's projections [D, V] and [V, D] are those of an MLP
with V hidden units ("embed", "mlp") and ("mlp", "embed").
"""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from memjax import ops
from memjax.nn.partitioning import dense
from memjax.nn.partitioning import layer_norm
from memjax.nn.partitioning import partitioned

# The name of the value table's parameter, wherever the table lives.
VALUES_PARAM = "memory_values"
# Logical axes of the value table: rows (memory slots) and the value dim.
VALUES_AXES = ("memory_slots", "embed")

_QUERY_NORMS = ("batch", "layer", None)


class ProductKeyValues(nn.Module):
  """The value table of a product-key memory: `num_rows` rows of `dim` values.

  Initialised from N(0, 1 / dim) as in the product-key paper. One instance passed to
  several `ProductKeyMemory` layers shares the table between them.

  Attributes:
    num_rows: number of rows, `n_keys ** 2` of the layers that read it.
    dim: dim V of each row.
  """
  num_rows: int
  dim: int

  @nn.compact
  def __call__(self, indices: jax.Array, weights: jax.Array) -> jax.Array:
    """Weighted sum of selected rows.

    Args:
      indices: int rows [..., L] in [0, num_rows).
      weights: their weights [..., L].

    Returns:
      [..., dim] float32.
    """
    init = nn.with_logical_partitioning(nn.initializers.normal(stddev=self.dim ** -0.5),
                                        VALUES_AXES)
    table = self.param(VALUES_PARAM, init, (self.num_rows, self.dim), jnp.float32)
    return ops.weighted_value_lookup(table, indices, weights)


def _sub_keys_init(key, shape, dtype=jnp.float32):
  """Uniform in +-1 / sqrt(K) with K the full key dim (shape [H, 2, n_keys, K // 2])."""
  bound = (2 * shape[-1]) ** -0.5
  return jax.random.uniform(key, shape, dtype, -bound, bound)


class ProductKeyMemory(nn.Module):
  """Product-key memory layer: [..., D] -> [..., D]; see the module docstring.

  Attributes:
    n_keys: sub-keys per half; the memory has `n_keys ** 2` values.
    heads: number of query heads (each with its own sub-keys; the values are shared).
    knn: values selected per head.
    k_dim: query and key dim K of each head (even: split in two halves).
    v_dim: dim V of the values; the input dim D when None.
    query_norm: "batch" (batch norm of the query, as in the product-key paper; statistics
      update with `train=True` and `mutable=["batch_stats"]`), "layer" (layer norm of each
      head's query) or None.
    swilu: gate the read with `silu(swilu_proj(x))` and project it back to D (Memory Layers
      at Scale). Without it the read is projected only when V != D.
    values: a `ProductKeyValues` shared with other layers; None creates this layer's own.
    implementation: of the top-k search: "reference" (brute force), "xla" or None.
  """
  n_keys: int = 512
  heads: int = 4
  knn: int = 32
  k_dim: int = 512
  v_dim: Optional[int] = None
  query_norm: Optional[str] = None
  swilu: bool = True
  values: Optional[ProductKeyValues] = None
  implementation: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Reads the memory for every position of `x`.

    Args:
      x: inputs [..., D].
      train: batch norm of the query uses (and updates) batch statistics; ignored by the
        other query norms.

    Returns:
      [..., D] in the dtype of `x`.
    """
    if x.ndim < 1:
      raise ValueError(f"x must have shape [..., D], got {tuple(x.shape)}")
    if self.query_norm not in _QUERY_NORMS:
      raise ValueError(f"query_norm must be one of {_QUERY_NORMS}, got {self.query_norm!r}")
    if self.k_dim % 2:
      raise ValueError(f"k_dim must be even (two halves of each key), got {self.k_dim}")
    d = x.shape[-1]
    v_dim = self.v_dim or d
    table = self.values
    if table is None:
      table = ProductKeyValues(self.n_keys ** 2, v_dim, name="values")
    elif (table.num_rows, table.dim) != (self.n_keys ** 2, v_dim):
      raise ValueError(
          f"values must be a table of shape [n_keys ** 2, v_dim] = "
          f"{(self.n_keys ** 2, v_dim)}, got ProductKeyValues of shape "
          f"{(table.num_rows, table.dim)}")

    query = dense(self.heads * self.k_dim, ("embed", "heads"), use_bias=True,
                  name="query_proj")(x)
    if self.query_norm == "batch":
      query = nn.BatchNorm(use_running_average=not train,
                           scale_init=partitioned(nn.initializers.ones, ("heads",)),
                           bias_init=partitioned(nn.initializers.zeros, ("heads",)),
                           name="query_norm")(query)
    query = query.reshape(*x.shape[:-1], self.heads, self.k_dim)
    if self.query_norm == "layer":
      query = layer_norm((None,), name="query_norm")(query)
    sub_keys = self.param("sub_keys", partitioned(_sub_keys_init, ("heads", None, None, None)),
                          (self.heads, 2, self.n_keys, self.k_dim // 2), jnp.float32)

    scores, indices = ops.product_key_topk(query, sub_keys, self.knn,
                                           implementation=self.implementation)
    weights = jax.nn.softmax(scores, axis=-1)
    # The heads read the same table, so their selections are summed as one bag.
    flat = lambda a: a.reshape(*a.shape[:-2], self.heads * self.knn)
    read = table(flat(indices), flat(weights))  # [..., V]

    if self.swilu:
      read = read * jax.nn.silu(dense(v_dim, ("embed", "mlp"), name="swilu_proj")(x))
    if self.swilu or v_dim != d:
      read = dense(d, ("mlp", "embed"), name="out_proj")(read)
    return read.astype(x.dtype)
