"""NeuralMemory: the long-term memory module (LMM) of Titans as a token mixer.

The layer of Titans (arXiv 2501.00663, §3-4) and Miras (arXiv 2504.13173, §5): q/k/v
projections, each through a causal depthwise short convolution with SiLU, L2-normalised q
and k, per-token gates (learning rate theta, momentum eta, forget alpha, and Yaad's Huber
threshold) from low-rank projections of the input, the neural memory op
(`memjax.ops.neural_memory`) per head, a per-head RMSNorm gated by a linear map of the input,
and an output projection. `num_persistent_tokens` learnable tokens are written into the
memory before the sequence (they are part of the state `init_state` returns).

State is explicit: `y, state = layer.apply(params, x, state)`; the state at the start of a
sequence is `layer.apply(params, batch_size, method="init_state")` (it needs the parameters:
the memory's meta-learned initial weights and the persistent tokens). `read` retrieves with
given memory weights without writing (the `M*` of Titans §4.1, for `TitansMAC`).

Logical axes of the parameters: the projections into heads [D, H * K] ("embed", "heads"),
the output projection [H * K, D] ("heads", "embed"), the memory's initial weights
[H, d_in, d_out] ("heads", None, None), the gates' up projections [rank, H] (None, "heads"),
so tensor parallelism gives each device whole heads; the persistent tokens [N, D] are
(None, "embed").

Under a mesh that splits the sequence over "seq", a fresh sequence (no state given, no
persistent tokens) through a linear memory (`memory_depth=1`) with the "titans" rule runs
`memjax.sharding.context_parallel_neural_memory` when each shard holds whole chunks. The MLP
memory and the other Miras rules are not affine in the state, so there XLA partitions the
layer, which is correct but gathers the sequence.
"""

from typing import NamedTuple, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from memjax import ops
from memjax import sharding
from memjax.ops import chunking
from memjax.ops import miras
from memjax.ops import titans as titans_ops
from memjax.ops import titans_memory
from memjax.nn.conv import ShortConvolution
from memjax.nn.norms import GatedRMSNorm
from memjax.nn.norms import l2_normalize
from memjax.nn.partitioning import dense
from memjax.nn.partitioning import partitioned
from memjax.sharding import context_parallel_titans


class NeuralMemoryLayerState(NamedTuple):
  """Recurrent state of a NeuralMemory layer.

  Attributes:
    conv_q, conv_k, conv_v: last inputs of the convolutions [B, conv_size - 1, H * K].
    memory: the `memjax.ops.NeuralMemoryState` of the per-head memories.
  """
  conv_q: jax.Array
  conv_k: jax.Array
  conv_v: jax.Array
  memory: titans_ops.NeuralMemoryState


class LowRankGate(nn.Module):
  """`W_up W_down x`: one value per head from a rank-`rank` projection of the input.

  Attributes:
    num_heads: outputs H.
    rank: inner width.
    bias_init: initial bias of the output (sets the gate's starting value).
  """
  num_heads: int
  rank: int
  bias_init: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, T, D] -> float32 pre-activations [B, T, H]."""
    down = dense(self.rank, ("embed", None), name="down")(x)
    up = dense(self.num_heads, (None, "heads"), use_bias=True, name="up",
               bias_init=nn.initializers.constant(self.bias_init))(down)
    return up.astype(jnp.float32)


class _DenseTo(nn.Module):
  """A bias-free Dense [H * K] -> D whose output width is given at call time (the model
  width D)."""

  @nn.compact
  def __call__(self, x: jax.Array, features: int) -> jax.Array:
    return dense(features, ("heads", "embed"), name="dense")(x)


class PersistentTokens(nn.Module):
  """`num_tokens` learnable input-independent tokens of width given at call time."""
  num_tokens: int

  @nn.compact
  def __call__(self, dim: int) -> jax.Array:
    """-> [num_tokens, dim]."""
    init = partitioned(nn.initializers.normal(stddev=0.02), (None, "embed"))
    return self.param("tokens", init, (self.num_tokens, dim))


# Default ceiling of theta, the Titans memories' inner learning rate; every layer and
# model that builds a Titans memory takes its default from here (see
# `NeuralMemory.max_learning_rate`).
DEFAULT_MAX_LEARNING_RATE = 0.01


class NeuralMemory(nn.Module):
  """Multi-head neural long-term memory mixer; see the module docstring.

  Attributes:
    num_heads: number of heads H.
    head_dim: key and value dim of each head (K = V).
    memory_depth: layers of the memory: 1 is a linear map, >= 2 the residual MLP.
    memory_expansion: hidden width of the MLP memory over head_dim.
    rule: a `memjax.ops.MirasRule` or preset ("titans", "moneta", "yaad", "memora").
    use_momentum: learn eta (Titans); False is plain gradient descent (Moneta, Yaad, Memora).
    max_learning_rate: theta = max_learning_rate * sigmoid(.). Too large a ceiling makes
      the inner update diverge: the gradients of a chunk are all taken at its start, so
      with momentum near 1 one chunk moves the weights by up to about C^2 / 2 steps of
      theta with no feedback. S-NIAH training turned NaN at 0.1 for both memories; at 0.01
      the linear memory solved S-NIAH and MQAR and the MLP memory the CPU MQAR job
      (RESULTS.md). titans-pytorch's default is about 0.016 in these units (it averages
      the loss over the V features).
    gate_rank: rank of the gate projections.
    num_persistent_tokens: learnable tokens written into the memory before the sequence.
    activation: sigma of the MLP memory.
    conv_size: width of the short convolutions; 0 turns them off.
    chunk_size: tokens whose gradients share the weights of their chunk's start.
    implementation: passed to `memjax.ops.neural_memory`.
  """
  num_heads: int = 4
  head_dim: int = 64
  memory_depth: int = 2
  memory_expansion: float = 4.0
  rule: Union[str, miras.MirasRule] = "titans"
  use_momentum: bool = True
  max_learning_rate: float = DEFAULT_MAX_LEARNING_RATE
  gate_rank: int = 32
  num_persistent_tokens: int = 0
  activation: str = "gelu"
  conv_size: int = 4
  chunk_size: int = 64
  implementation: Optional[str] = None

  def setup(self):
    h, k = self.num_heads, self.head_dim
    into_heads = lambda n, name: dense(n, ("embed", "heads"), name=name)
    self.q_proj, self.k_proj, self.v_proj = (into_heads(h * k, f"{n}_proj") for n in "qkv")
    if self.conv_size > 0:
      self.q_conv, self.k_conv, self.v_conv = (
          ShortConvolution(self.conv_size, name=f"{n}_conv") for n in "qkv")
    # Start with a small learning rate, strong retention and some momentum. The MLP
    # memory starts with 50x less forgetting (alpha 3e-4 against 0.018 per token): its
    # LayerNorm makes the output blind to the weights' scale, so forgetting shrinks the
    # weights freely, the step theta / |W|^2 grows as they shrink, and the outer
    # gradients through a 1,024-token sequence then explode (to inf with 16-token chunks).
    self.theta_gate = LowRankGate(h, self.gate_rank, bias_init=-2.0, name="theta_gate")
    self.alpha_gate = LowRankGate(h, self.gate_rank, name="alpha_gate",
                                  bias_init=-4.0 if self.memory_depth == 1 else -8.0)
    if self.use_momentum:
      self.eta_gate = LowRankGate(h, self.gate_rank, bias_init=1.0, name="eta_gate")
    if miras.resolve(self.rule).loss == "huber":
      self.huber_gate = LowRankGate(h, self.gate_rank, bias_init=1.0, name="huber_gate")
    dims = [k] + [int(self.memory_expansion * k)] * (self.memory_depth - 1) + [k]
    self.memory_weights = tuple(
        self.param(f"memory_w{i}", partitioned(nn.initializers.normal(stddev=d_in ** -0.5),
                                               ("heads", None, None)), (h, d_in, d_out))
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])))
    self.gate_proj = into_heads(h * k, "gate_proj")
    self.out_norm = GatedRMSNorm(name="out_norm")
    self.out_proj = _DenseTo(name="out_proj")
    if self.num_persistent_tokens > 0:
      self.persistent = PersistentTokens(self.num_persistent_tokens, name="persistent")

  def init_state(self, batch_size: int, dim: Optional[int] = None) -> NeuralMemoryLayerState:
    """The state at the start of a sequence, with the persistent tokens memorised.

    Args:
      batch_size: B.
      dim: model width D (needed only with persistent tokens; the input's last dim).

    Returns:
      A `NeuralMemoryLayerState` for [batch_size, ...].
    """
    hk = self.num_heads * self.head_dim
    # A detached helper (parent=None): it only computes the window shape.
    conv = ShortConvolution(max(self.conv_size, 1), parent=None)
    state = NeuralMemoryLayerState(
        conv_q=conv.init_state(batch_size, hk), conv_k=conv.init_state(batch_size, hk),
        conv_v=conv.init_state(batch_size, hk),
        memory=titans_ops.init_state(self.memory_weights, batch_size, rule=self.rule))
    if self.num_persistent_tokens > 0:
      if dim is None:
        raise ValueError("init_state needs dim (the model width D) when "
                         f"num_persistent_tokens = {self.num_persistent_tokens} > 0")
      tokens = self.persistent(dim)
      _, state = self._mix(jnp.broadcast_to(tokens, (batch_size,) + tokens.shape), state)
    return state

  def __call__(self, x: jax.Array, state: Optional[NeuralMemoryLayerState] = None):
    """Mixes a sequence; a single token (T = 1) takes the one-token step of the memory.

    Args:
      x: inputs [B, T, D].
      state: the state after the previous tokens; `init_state(B, D)` when None.

    Returns:
      `(y, state)`: outputs [B, T, D] and the state after the last token.
    """
    # Context parallelism needs the memory at a chunk start: a fresh sequence with no
    # persistent tokens before it.
    fresh = state is None and self.num_persistent_tokens == 0
    if state is None:
      state = self.init_state(x.shape[0], x.shape[-1])
    return self._mix(x, state, fresh)

  def read(self, x: jax.Array, weights, conv_q: jax.Array):
    """`M*(q)`: the layer's output for queries from x with fixed memory weights, no write.

    The retrieval of Titans eq 21 (`h_t = M*_{t-1}(q_t)`): the same query path and output
    path as `__call__`, but the memory is only read, so nothing is learned from x.

    Args:
      x: inputs [B, T, D].
      weights: the memory weights to read, per layer [B, H, d_in, d_out] (for instance
        `state.memory.weights` of a `NeuralMemoryLayerState`).
      conv_q: the query convolution's window over the previous inputs of this stream
        [B, conv_size - 1, H * K] (a read stream keeps its own window).

    Returns:
      `(y, conv_q)`: outputs [B, T, D] and the window after x.
    """
    b, t, _ = x.shape
    q, conv_q = self._features("q", x, conv_q)
    q = jnp.swapaxes(l2_normalize(q.reshape(b, t, self.num_heads, self.head_dim)), 1, 2)
    o, _ = titans_memory.forward(weights, q.astype(jnp.float32), self.activation,
                                 chunking.matmul_precision(x.dtype))
    return self._output(jnp.swapaxes(o, 1, 2).astype(x.dtype), x), conv_q

  def _context_parallel(self, t: int, fresh: bool):
    """The mesh arguments of `context_parallel_neural_memory` for a sequence of t tokens,
    or None where it does not apply (no mesh splits the sequence; an MLP memory or a
    non-l2 rule, which are not affine in the state; shards that would not start chunks).
    Then XLA partitions the unsharded op, which is correct but gathers the sequence."""
    if not fresh or context_parallel_titans.unsupported(self.rule, self.memory_depth):
      return None
    seq_sharding = sharding.current_seq_sharding(
        nn.get_logical_axis_rules() or sharding.DEFAULT_RULES)
    if seq_sharding is None:
      return None
    devices = seq_sharding["mesh"].shape[seq_sharding["seq_axis"]]
    if t % devices or (t // devices) % self.chunk_size:
      return None
    return seq_sharding

  def _features(self, name, x, window):
    """Projection `name` ("q", "k" or "v") through its short convolution (or SiLU if none)."""
    y = getattr(self, f"{name}_proj")(x)
    if self.conv_size > 0:
      return getattr(self, f"{name}_conv")(y, window)
    return jax.nn.silu(y), window

  def _output(self, o, x):
    """Per-head gated RMSNorm of the memory outputs o [B, T, H, V], then D outputs."""
    b, t, d = x.shape
    gate = self.gate_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    return self.out_proj(self.out_norm(o, gate).reshape(b, t, -1), d)

  def _mix(self, x, state, fresh=False):
    """The layer on the sequence x from `state`; `fresh`: the state is at a chunk start."""
    b, t, _ = x.shape
    h, k = self.num_heads, self.head_dim
    q, conv_q = self._features("q", x, state.conv_q)
    kk, conv_k = self._features("k", x, state.conv_k)
    vv, conv_v = self._features("v", x, state.conv_v)
    q = l2_normalize(q.reshape(b, t, h, k))
    kk = l2_normalize(kk.reshape(b, t, h, k))
    vv = vv.reshape(b, t, h, k)
    theta = self.max_learning_rate * jax.nn.sigmoid(self.theta_gate(x))
    alpha = jax.nn.sigmoid(self.alpha_gate(x))
    eta = jax.nn.sigmoid(self.eta_gate(x)) if self.use_momentum else None
    delta = None
    if miras.resolve(self.rule).loss == "huber":
      delta = jax.nn.softplus(self.huber_gate(x))
    common = dict(rule=self.rule, activation=self.activation)
    seq_sharding = self._context_parallel(t, fresh) if t > 1 else None
    if t == 1:
      first = lambda a: None if a is None else a[:, 0]
      o, memory = ops.neural_memory_step(
          first(q), first(kk), first(vv), first(theta), first(eta), first(alpha),
          first(delta), state=state.memory, chunk_size=self.chunk_size, **common)
      o = o[:, None]
    elif seq_sharding is not None:
      # A mesh splits the sequence: the shards pass states on rather than gather tokens.
      o, memory = sharding.context_parallel_neural_memory(
          q, kk, vv, theta, eta, alpha, rule=self.rule, initial_state=state.memory,
          return_final_state=True, chunk_size=self.chunk_size,
          implementation=self.implementation, **seq_sharding)
    else:
      o, memory = ops.neural_memory(
          q, kk, vv, theta, eta, alpha, huber_delta=delta, initial_state=state.memory,
          return_final_state=True, chunk_size=self.chunk_size,
          implementation=self.implementation, **common)
    return self._output(o, x), NeuralMemoryLayerState(conv_q, conv_k, conv_v, memory)
