"""Associative-memory token mixers: LinearAttention, DeltaNet and GatedDeltaNet.

All three share the Gated DeltaNet paper's layer (arXiv 2412.06464, §3): q/k/v
projections, a causal depthwise short convolution with SiLU on each, L2-normalised q and k,
`beta = sigmoid(W_beta x)`, the Mamba2-style decay `g = -exp(A_log) * softplus(W_a x +
dt_bias)`, a per-head RMSNorm gated by `silu(W_gate x)`, and an output projection. They
differ only in the memory rule they call:

* `LinearAttention`: `S_t = S_{t-1} + k_t v_t^T` (with `use_decay=True`: gated linear attention);
* `DeltaNet`: the delta rule (`beta`, no decay);
* `GatedDeltaNet`: the gated delta rule (`beta` and decay).

State is explicit: `y, state = layer.apply(params, x, state)`, where the state holds the
short-convolution windows and the float32 memory [B, H, K, V].

Context parallelism: traced under a mesh whose "seq" axis has more than one device (the
steps of `memjax.train`, `jax.set_mesh` or `jax.sharding.use_abstract_mesh`), a sequence
runs its memory rule through `memjax.sharding.context_parallel_*`, with the tokens split
over "seq", the batch and the heads as the logical axis rules in effect say
(`flax.linen.logical_axis_rules`, else `memjax.sharding.DEFAULT_RULES`); B, T and H must be
divisible by their devices. Only the memory state [B, H, K, V] of each shard crosses the
"seq" devices, where XLA would gather the sequence. The projections, short convolutions and
norms are per token (or a short causal window) and XLA partitions them. A single token
(decoding) takes the unsharded one-token step.

Logical axes of the parameters: the projections into heads [D, H * K] ("embed", "heads"),
the output projection [H * V, D] ("heads", "embed"), the per-head `A_log` and `dt_bias`
("heads",), so tensor parallelism gives each device whole heads.
"""

import math
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from memjax import ops
from memjax import sharding
from memjax.nn.conv import ShortConvolution
from memjax.nn.norms import GatedRMSNorm
from memjax.nn.norms import l2_normalize
from memjax.nn.partitioning import dense
from memjax.nn.partitioning import partitioned


class AssociativeMemoryState(NamedTuple):
  """Recurrent state of an associative-memory mixer.

  Attributes:
    conv_q, conv_k: last inputs of the q and k convolutions [B, conv_size - 1, H * K].
    conv_v: last inputs of the v convolution [B, conv_size - 1, H * V].
    memory: the associative memory [B, H, K, V], float32.
  """
  conv_q: jax.Array
  conv_k: jax.Array
  conv_v: jax.Array
  memory: jax.Array


def _decay_bias_init(dt_min: float = 1e-3, dt_max: float = 0.1):
  """Initialises dt_bias so that softplus(dt_bias) is log-uniform in [dt_min, dt_max]."""

  def init(key, shape, dtype=jnp.float32):
    log_dt = jax.random.uniform(key, shape, dtype, math.log(dt_min), math.log(dt_max))
    dt = jnp.exp(log_dt)
    return dt + jnp.log(-jnp.expm1(-dt))  # The inverse of softplus.

  return init


def _a_log_init(key, shape, dtype=jnp.float32):
  """A uniform in [1, 16], as in Mamba2 and Gated DeltaNet; stored as log A."""
  return jnp.log(jax.random.uniform(key, shape, dtype, 1.0, 16.0))


class AssociativeMemory(nn.Module):
  """Multi-head associative-memory mixer; see the module docstring.

  Attributes:
    num_heads: number of heads H.
    head_dim: key dim K of each head.
    expand_v: value dim V = head_dim * expand_v.
    use_beta: write with the delta rule's strength beta (DeltaNet family) instead of a plain
      outer product (linear attention).
    use_decay: apply the data-dependent log-decay g (gated variants).
    conv_size: width of the short convolutions; 0 turns them off.
    chunk_size: chunk length of the chunkwise form.
    implementation: passed to `memjax.ops` ("reference", "xla", "pallas" or None).
  """
  num_heads: int = 4
  head_dim: int = 64
  expand_v: float = 1.0
  use_beta: bool = True
  use_decay: bool = True
  conv_size: int = 4
  chunk_size: int = 64
  implementation: Optional[str] = None

  @property
  def value_dim(self) -> int:
    return int(self.head_dim * self.expand_v)

  def init_state(self, batch_size: int) -> AssociativeMemoryState:
    """The state at the start of a sequence: zeros, [batch_size, ...] (see the state type)."""
    h, k, v = self.num_heads, self.head_dim, self.value_dim
    # parent=None: a detached helper, not a submodule (it only computes the window shape).
    conv = ShortConvolution(max(self.conv_size, 1), parent=None)
    return AssociativeMemoryState(
        conv_q=conv.init_state(batch_size, h * k), conv_k=conv.init_state(batch_size, h * k),
        conv_v=conv.init_state(batch_size, h * v),
        memory=jnp.zeros((batch_size, h, k, v), jnp.float32))

  @nn.compact
  def __call__(self, x: jax.Array, state: Optional[AssociativeMemoryState] = None):
    """Mixes a sequence; a single token (T = 1) takes the one-token step of the memory rule.

    Args:
      x: inputs [B, T, D].
      state: the state after the previous tokens; `init_state(B)` when None.

    Returns:
      `(y, state)`: outputs [B, T, D] and the state after the last token.
    """
    b, t, d = x.shape
    h, k, v = self.num_heads, self.head_dim, self.value_dim
    if state is None:
      state = self.init_state(b)
    into_heads = lambda n, name: dense(n, ("embed", "heads"), name=name)
    q, kk, vv = (into_heads(h * k, "q_proj")(x), into_heads(h * k, "k_proj")(x),
                 into_heads(h * v, "v_proj")(x))
    conv_q, conv_k, conv_v = state.conv_q, state.conv_k, state.conv_v
    if self.conv_size > 0:
      q, conv_q = ShortConvolution(self.conv_size, name="q_conv")(q, conv_q)
      kk, conv_k = ShortConvolution(self.conv_size, name="k_conv")(kk, conv_k)
      vv, conv_v = ShortConvolution(self.conv_size, name="v_conv")(vv, conv_v)
    q = l2_normalize(q.reshape(b, t, h, k))
    kk = l2_normalize(kk.reshape(b, t, h, k))
    vv = vv.reshape(b, t, h, v)
    beta = None
    if self.use_beta:
      beta = jax.nn.sigmoid(into_heads(h, "beta_proj")(x).astype(jnp.float32))
    g = None
    if self.use_decay:
      a_log = self.param("A_log", partitioned(_a_log_init, ("heads",)), (h,))
      dt_bias = self.param("dt_bias", partitioned(_decay_bias_init(), ("heads",)), (h,))
      g = -jnp.exp(a_log) * jax.nn.softplus(
          into_heads(h, "a_proj")(x).astype(jnp.float32) + dt_bias)

    o, memory = self._memory(q, kk, vv, beta, g, state.memory)
    gate = into_heads(h * v, "gate_proj")(x).reshape(b, t, h, v)
    y = GatedRMSNorm(name="out_norm")(o, gate).reshape(b, t, h * v)
    y = dense(d, ("heads", "embed"), name="out_proj")(y)
    return y, AssociativeMemoryState(conv_q, conv_k, conv_v, memory)

  def _memory(self, q, k, v, beta, g, memory):
    """Runs the memory rule: [B, T, H, *] inputs -> (o [B, T, H, V], memory [B, H, K, V])."""
    if q.shape[1] == 1:
      # Decoding: the one-token step avoids padding a whole chunk.
      first = lambda x: None if x is None else x[:, 0]
      if self.use_beta:
        o, memory = ops.delta_rule_step(first(q), first(k), first(v), first(beta), first(g),
                                        state=memory)
      else:
        o, memory = ops.linear_attention_step(first(q), first(k), first(v), first(g),
                                              state=memory)
      return o[:, None], memory
    common = dict(initial_state=memory, return_final_state=True,
                  chunk_size=self.chunk_size, implementation=self.implementation)
    delta_rule, linear_attention = ops.delta_rule, ops.linear_attention
    # A mesh that splits the sequence: the shards pass states on rather than gather tokens.
    seq_sharding = sharding.current_seq_sharding(
        nn.get_logical_axis_rules() or sharding.DEFAULT_RULES)
    if seq_sharding is not None:
      common.update(seq_sharding)
      delta_rule = sharding.context_parallel_delta_rule
      linear_attention = sharding.context_parallel_linear_attention
    if self.use_beta:
      return delta_rule(q, k, v, beta, g, **common)
    return linear_attention(q, k, v, g, **common)


class LinearAttention(AssociativeMemory):
  """Linear attention mixer (no write strength, no decay unless `use_decay=True`)."""
  use_beta: bool = False
  use_decay: bool = False


class DeltaNet(AssociativeMemory):
  """DeltaNet mixer: the delta rule, no decay."""
  use_beta: bool = True
  use_decay: bool = False


class GatedDeltaNet(AssociativeMemory):
  """Gated DeltaNet mixer: the gated delta rule."""
  use_beta: bool = True
  use_decay: bool = True
