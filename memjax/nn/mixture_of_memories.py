"""Mixture-of-Memories token mixer (MoM, arXiv 2502.13685) with gated-delta-rule memories.

A linear router (no bias) scores M memories per token; `memjax.ops.top_k_routing` keeps
the top k of their softmax, renormalised to sum to 1. Each memory has its own key, value,
write-strength and decay projections (the decay's `A_log` and `dt_bias` are per head,
shared by the memories); the read query is shared. A token writes only the memories it is
routed to, and reads their mixture with its routing weights; an optional shared memory is
written and read by every token with weight 1 (`memjax.ops.mixture_of_memories`):

    o_t = sum_{m in topk(t)} w_tm * scale * S^m_t^T q_t + scale * S^shared_t^T q_t.

The rest is the Gated DeltaNet layer of `memjax.nn.associative`: short convolutions with
SiLU, L2-normalised q and k, a per-head RMSNorm gated by `silu(W_gate x)` and an output
projection. The short convolutions run over the whole token stream (each memory's keys
and values see the previous tokens whether or not those were routed to it); the MoM code
release instead convolves each memory's own routed sub-sequence.

The router logits are sown as `intermediates/router_logits` [B, T, M] for auxiliary losses
(e.g. load balancing): `layer.apply(params, x, mutable=["intermediates"])`.

Logical axes of the parameters: the per-head ones (q and gate projections [D, H * K],
`A_log`, `dt_bias`, the output projection [H * V, D]) split over "heads" as in
`memjax.nn.associative`. The per-memory projections (k, v [D, E * H * K], beta and a
[D, E * H]) and the router [D, M] keep their outputs whole (None): their outputs are
memory-major, so an even split of them would not give each device whole heads (and E * H
counts the shared memory, which mesh sizes rarely divide).

Under a mesh that splits the sequence over "seq", `memjax.ops.mixture_of_memories` has no
context-parallel version (unlike the mixers of `memjax.nn.associative`): XLA partitions the
layer, which is correct but gathers the sequence.
"""

from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from memjax import ops
from memjax.nn.associative import _a_log_init
from memjax.nn.associative import _decay_bias_init
from memjax.nn.conv import ShortConvolution
from memjax.nn.norms import GatedRMSNorm
from memjax.nn.norms import l2_normalize
from memjax.nn.partitioning import dense
from memjax.nn.partitioning import partitioned


class MixtureOfMemoriesState(NamedTuple):
  """Recurrent state of a MixtureOfMemories mixer (E = M memories, + 1 if shared).

  Attributes:
    conv_q: last inputs of the q convolution [B, conv_size - 1, H * K].
    conv_k: last inputs of the k convolution [B, conv_size - 1, E * H * K].
    conv_v: last inputs of the v convolution [B, conv_size - 1, E * H * V].
    memory: the memories [B, E, H, K, V] float32; the shared memory, if any, is last.
  """
  conv_q: jax.Array
  conv_k: jax.Array
  conv_v: jax.Array
  memory: jax.Array


class MixtureOfMemories(nn.Module):
  """MoM mixer over gated-delta-rule memories; see the module docstring.

  Attributes:
    num_memories: number of routed memories M.
    top_k: memories each token writes and reads, 1 <= top_k <= M (M: a dense mixture).
    shared_memory: add a memory that every token writes and reads with weight 1.
    num_heads: number of heads H.
    head_dim: key dim K of each head.
    expand_v: value dim V = head_dim * expand_v.
    conv_size: width of the short convolutions; 0 turns them off.
    chunk_size: chunk length of the chunkwise form.
    implementation: passed to `memjax.ops.mixture_of_memories` ("reference", "xla",
      "pallas" or None).
  """
  num_memories: int = 4
  top_k: int = 2
  shared_memory: bool = True
  num_heads: int = 4
  head_dim: int = 64
  expand_v: float = 1.0
  conv_size: int = 4
  chunk_size: int = 64
  implementation: Optional[str] = None

  @property
  def value_dim(self) -> int:
    return int(self.head_dim * self.expand_v)

  @property
  def num_states(self) -> int:
    """E: the routed memories plus the shared one."""
    return self.num_memories + int(self.shared_memory)

  def init_state(self, batch_size: int) -> MixtureOfMemoriesState:
    """The state at the start of a sequence: zeros, [batch_size, ...] (see the state type)."""
    e, h, k, v = self.num_states, self.num_heads, self.head_dim, self.value_dim
    # parent=None: a detached helper, not a submodule (it only computes the window shape).
    conv = ShortConvolution(max(self.conv_size, 1), parent=None)
    return MixtureOfMemoriesState(
        conv_q=conv.init_state(batch_size, h * k), conv_k=conv.init_state(batch_size, e * h * k),
        conv_v=conv.init_state(batch_size, e * h * v),
        memory=jnp.zeros((batch_size, e, h, k, v), jnp.float32))

  def _check_state(self, state: MixtureOfMemoriesState, batch_size: int) -> None:
    """Raises ValueError unless every field of `state` has the shape `init_state` gives."""
    expected = jax.eval_shape(lambda: self.init_state(batch_size))
    for name, got, want in zip(MixtureOfMemoriesState._fields, state, expected):
      if tuple(got.shape) != tuple(want.shape):
        raise ValueError(
            f"state.{name} must have shape {tuple(want.shape)} (see MixtureOfMemoriesState; "
            f"batch {batch_size}), got {tuple(got.shape)}")

  @nn.compact
  def __call__(self, x: jax.Array, state: Optional[MixtureOfMemoriesState] = None):
    """Mixes a sequence; a single token (T = 1) takes the one-token step.

    Args:
      x: inputs [B, T, D].
      state: the state after the previous tokens; `init_state(B)` when None.

    Returns:
      `(y, state)`: outputs [B, T, D] and the state after the last token.
    """
    if x.ndim != 3:
      raise ValueError(f"x must have shape [B, T, D], got {tuple(x.shape)}")
    b, t, d = x.shape
    e, h, k, v = self.num_states, self.num_heads, self.head_dim, self.value_dim
    if state is None:
      state = self.init_state(b)
    self._check_state(state, b)
    into_heads = lambda n, name: dense(n, ("embed", "heads"), name=name)
    per_memory = lambda n, name: dense(n, ("embed", None), name=name)

    logits = per_memory(self.num_memories, "router")(x).astype(jnp.float32)
    self.sow("intermediates", "router_logits", logits)
    weights = ops.top_k_routing(logits, self.top_k)  # [B, T, M]
    if self.shared_memory:
      weights = jnp.concatenate([weights, jnp.ones((b, t, 1), weights.dtype)], axis=-1)

    q = into_heads(h * k, "q_proj")(x)
    kk, vv = per_memory(e * h * k, "k_proj")(x), per_memory(e * h * v, "v_proj")(x)
    conv_q, conv_k, conv_v = state.conv_q, state.conv_k, state.conv_v
    if self.conv_size > 0:
      q, conv_q = ShortConvolution(self.conv_size, name="q_conv")(q, conv_q)
      kk, conv_k = ShortConvolution(self.conv_size, None, name="k_conv")(kk, conv_k)
      vv, conv_v = ShortConvolution(self.conv_size, None, name="v_conv")(vv, conv_v)
    q = l2_normalize(q.reshape(b, t, h, k))
    kk = l2_normalize(kk.reshape(b, t, e, h, k))
    vv = vv.reshape(b, t, e, h, v)
    beta = jax.nn.sigmoid(per_memory(e * h, "beta_proj")(x).astype(jnp.float32)).reshape(
        b, t, e, h)
    a_log = self.param("A_log", partitioned(_a_log_init, ("heads",)), (h,))
    dt_bias = self.param("dt_bias", partitioned(_decay_bias_init(), ("heads",)), (h,))
    a = per_memory(e * h, "a_proj")(x).astype(jnp.float32).reshape(b, t, e, h)
    g = -jnp.exp(a_log) * jax.nn.softplus(a + dt_bias)

    if t == 1:
      # Decoding: the one-token step avoids padding a whole chunk.
      first = lambda z: z[:, 0]
      o, memory = ops.mixture_of_memories_step(
          *map(first, (q, kk, vv, beta, g, weights)), state=state.memory)
      o = o[:, None]
    else:
      o, memory = ops.mixture_of_memories(
          q, kk, vv, beta, g, weights, initial_state=state.memory, return_final_state=True,
          chunk_size=self.chunk_size, implementation=self.implementation)
    gate = into_heads(h * v, "gate_proj")(x).reshape(b, t, h, v)
    y = GatedRMSNorm(name="out_norm")(o, gate).reshape(b, t, h * v)
    y = dense(d, ("heads", "embed"), name="out_proj")(y)
    return y, MixtureOfMemoriesState(conv_q, conv_k, conv_v, memory)
