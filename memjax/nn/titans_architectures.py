"""The Titans architectures (arXiv 2501.00663, §4): the neural memory with attention.

Three token mixers built from `NeuralMemory` (the LMM) and softmax attention, each with
`num_persistent_tokens` learnable input-independent tokens `p_1 ... p_Np`:

* `TitansMAC`, memory as a context (§4.1, eqs 21-25): the sequence is cut into segments;
  each segment attends over [persistent | retrievals from the memory | segment], and the
  attention outputs are written into the memory and gate the memory's read of them.
* `TitansMAG`, memory as a gate (§4.2, eqs 26-28): sliding-window attention that keeps
  the persistent tokens visible to every token (SW-Attn*) and the memory run side by side
  over `[persistent | x]`; the memory gates the attention.
* `TitansMAL`, memory as a layer (§4.3, eqs 29-31): the memory over `[persistent | x]`,
  then plain sliding-window attention (SW-Attn, no prefix) over its outputs.

The paper's gating `⊗` (eqs 25, 28) is `RMSNorm(y) * sigmoid(RMSNorm(m))`: both outputs
normalised with learnable vector-valued weights, then a non-linearity on the memory side.

Every layer maps `x [B, T, D]` to `(y [B, T, D], state)` with an explicit state:
`state = layer.apply(params, B, D, method="init_state")` (it needs the parameters: the
memory's initial weights and the persistent tokens), then `y, state = layer.apply(params,
x, state)`. Running a sequence in pieces or token by token gives the outputs of one call.

Under a mesh that splits the sequence over "seq", neither the memory nor the attention has
a context-parallel op: XLA partitions these layers, which is correct but gathers the
sequence.
"""

from typing import ClassVar, NamedTuple, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from memjax.nn.attention import AttentionState
from memjax.nn.attention import CausalSelfAttention
from memjax.nn.attention import rotary_embedding
from memjax.nn.norms import RMSNorm
from memjax.nn.partitioning import dense
from memjax.nn.partitioning import partitioned
from memjax.nn.partitioning import split_dense
from memjax.nn.titans import DEFAULT_MAX_LEARNING_RATE
from memjax.nn.titans import NeuralMemory
from memjax.nn.titans import NeuralMemoryLayerState
from memjax.nn.titans import PersistentTokens
from memjax.ops import miras


class TitansMACState(NamedTuple):
  """Recurrent state of `TitansMAC` (segment length C, H heads of K dims).

  Attributes:
    memory: the memory layer's state; its inputs are the attention outputs y (eq 24).
    read_conv: the query convolution's window over the inputs x, which the retrieval of
      eq 21 reads with [B, conv_size - 1, H * K].
    segment_start: M_{t-1}, the memory weights where the current segment started (per
      layer [B, H, d_in, d_out]); the segment's retrievals all read them.
    keys, values: rotary-applied keys and values [B, 2, C, H, K] of the current segment's
      retrievals (index 0) and tokens (index 1) so far, slot j for segment position j.
    position: int32 [], tokens already seen of the current segment.
  """
  memory: NeuralMemoryLayerState
  read_conv: jax.Array
  segment_start: Tuple[jax.Array, ...]
  keys: jax.Array
  values: jax.Array
  position: jax.Array


class TitansState(NamedTuple):
  """Recurrent state of `TitansMAG` and `TitansMAL`.

  Attributes:
    attention: KV cache of the (sliding-window) attention.
    memory: the memory layer's state.
  """
  attention: AttentionState
  memory: NeuralMemoryLayerState


def _check_positive(name: str, value, minimum: int = 1) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


class _OutputGate(nn.Module):
  """`y ⊗ m = RMSNorm(y) * sigmoid(RMSNorm(m))` (the gating of Titans eqs 25 and 28)."""

  @nn.compact
  def __call__(self, y: jax.Array, m: jax.Array) -> jax.Array:
    """y, m: [B, T, D] -> [B, T, D] in the dtype of y."""
    gate = jax.nn.sigmoid(RMSNorm(name="memory_norm")(m).astype(jnp.float32))
    return (RMSNorm(name="attention_norm")(y) * gate).astype(y.dtype)


class _Titans(nn.Module):
  """Attributes shared by the three architectures.

  Attributes:
    num_heads: heads H of the attention and of the memory.
    head_dim: dims K of each head (even, for the rotary embeddings).
    num_persistent_tokens: learnable tokens p_1 ... p_Np placed before the sequence.
    memory_depth: layers of the memory: 1 is a linear map, >= 2 the residual MLP.
    memory_expansion: hidden width of the MLP memory over head_dim.
    rule: a `memjax.ops.MirasRule` or preset of the memory ("titans", "yaad", ...).
    max_learning_rate: the memory's ceiling of its inner learning rate theta.
    chunk_size: tokens whose memory gradients share the weights of their chunk's start.
    implementation: of `memjax.ops.neural_memory` ("reference", "xla" or None).
    rope_base: wavelength base of the attention's rotary embeddings.
  """
  num_heads: int = 4
  head_dim: int = 64
  num_persistent_tokens: int = 4
  memory_depth: int = 2
  memory_expansion: float = 4.0
  rule: Union[str, miras.MirasRule] = "titans"
  max_learning_rate: float = DEFAULT_MAX_LEARNING_RATE
  chunk_size: int = 64
  implementation: Optional[str] = None
  rope_base: float = 10000.0

  def _memory(self) -> NeuralMemory:
    # The persistent tokens belong to the architecture (they also enter the attention),
    # so the memory layer has none of its own.
    return NeuralMemory(num_heads=self.num_heads, head_dim=self.head_dim,
                        memory_depth=self.memory_depth,
                        memory_expansion=self.memory_expansion, rule=self.rule,
                        max_learning_rate=self.max_learning_rate, chunk_size=self.chunk_size,
                        implementation=self.implementation, name="memory")

  def _check_config(self) -> None:
    _check_positive("num_heads", self.num_heads)
    _check_positive("num_persistent_tokens", self.num_persistent_tokens, 0)
    if not isinstance(self.head_dim, int) or self.head_dim < 2 or self.head_dim % 2:
      raise ValueError(f"head_dim must be an even int >= 2 (rotary embeddings rotate pairs), "
                       f"got {self.head_dim!r}")

  def _check_input(self, x: jax.Array) -> None:
    if x.ndim != 3 or x.shape[1] < 1:
      raise ValueError(f"x must have shape [B, T, D] with T >= 1, got {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"x must have a floating dtype, got {x.dtype} (shape {x.shape})")
    # While initialising (or given no parameters) there is no width to compare with.
    if self.is_initializing() or not self.memory.has_variable("params", "memory_w0"):
      return
    # Unboxed: parameters from `init` may still be in their partitioning boxes.
    want = nn.unbox(self.memory.variables["params"]["q_proj"]["kernel"]).shape[0]
    if x.shape[-1] != want:
      raise ValueError(f"x must have shape [B, T, D] with D = {want} (the width the "
                       f"parameters were made for), got {tuple(x.shape)}")

  def _check_memory_state(self, memory: NeuralMemoryLayerState, batch_size: int) -> None:
    if not isinstance(memory, NeuralMemoryLayerState):
      raise ValueError(f"state.memory must be a NeuralMemoryLayerState (see init_state), "
                       f"got {type(memory).__name__}")
    got = tuple(memory.memory.weights[0].shape)
    if got[:2] != (batch_size, self.num_heads):
      raise ValueError(f"state.memory.memory.weights[0] must have shape [B, H, K, ...] with "
                       f"B = {batch_size} (of x), H = {self.num_heads}, got {got}")


class _SegmentAttention(nn.Module):
  """Softmax attention of a segment's tokens over `[persistent | retrieved | segment]`.

  The attention of Titans eqs 22-23, `y_t = Attn([p_1 ... p_Np] || h_t || S^(t))`, for
  the queries of the segment tokens. Token i of the segment sees every persistent token,
  the retrievals h_j and the tokens S_j of segment positions j <= i. (The retrieval h_j is
  read with token j's query, so a token that saw h_j for j > i would see the future.)
  Rotary positions: persistent token n at n; h_j and S_j at Np + j.

  Attributes:
    num_heads, head_dim, num_persistent_tokens, rope_base: as in `TitansMAC`.
  """
  num_heads: int
  head_dim: int
  num_persistent_tokens: int
  rope_base: float

  @nn.compact
  def __call__(self, x, h, keys, values, position):
    """Attends for tokens at segment positions `position + [0, L)`, caching them.

    Args:
      x: the segment's tokens [B, L, D].
      h: their retrievals [B, L, D].
      keys, values: the cache [B, 2, C, H, K] of the retrievals (0) and tokens (1) at
        segment positions < position; `position + L <= C`.
      position: int32 [], tokens of this segment already cached.

    Returns:
      `(y [B, L, D], keys, values)` with the new tokens cached.
    """
    b, length, d = x.shape
    heads, hd, n_p = self.num_heads, self.head_dim, self.num_persistent_tokens
    # Keys and values of whole heads together: [D, 2, H, K].
    kv_proj = split_dense(d, (2, heads, hd), ("embed", None, "heads", None), name="kv_proj")
    rotate = lambda z, pos: rotary_embedding(z, pos, self.rope_base)
    at = n_p + position + jnp.arange(length, dtype=jnp.int32)
    q = rotate(dense(heads * hd, ("embed", "heads"), name="q_proj")(x).reshape(
        b, length, heads, hd), at)
    new = kv_proj(jnp.stack([h, x], axis=1))  # [B, 2, L, 2, H, K]
    new_k = jax.vmap(rotate, in_axes=(1, None), out_axes=1)(new[:, :, :, 0], at)
    keys = lax.dynamic_update_slice_in_dim(keys, new_k.astype(keys.dtype), position, axis=2)
    values = lax.dynamic_update_slice_in_dim(
        values, new[:, :, :, 1].astype(values.dtype), position, axis=2)
    c = keys.shape[2]
    all_k = keys.reshape(b, 2 * c, heads, hd).astype(q.dtype)
    all_v = values.reshape(b, 2 * c, heads, hd).astype(q.dtype)
    # Slot j of either block holds segment position j mod C: visible up to the query's own.
    visible = jnp.tile(jnp.arange(c), 2)[None, :] <= (at - n_p)[:, None]  # [L, 2C]
    if n_p > 0:
      tokens = self.param("persistent", partitioned(nn.initializers.normal(stddev=0.02),
                                                     (None, "embed")), (n_p, d))
      p_kv = kv_proj(tokens.astype(x.dtype))  # [Np, 2, H, K]
      p_k = rotate(p_kv[None, :, 0], jnp.arange(n_p))
      all_k = jnp.concatenate([jnp.broadcast_to(p_k, (b,) + p_k.shape[1:]), all_k], axis=1)
      all_v = jnp.concatenate(
          [jnp.broadcast_to(p_kv[None, :, 1], (b, n_p, heads, hd)), all_v], axis=1)
      visible = jnp.concatenate([jnp.ones((length, n_p), bool), visible], axis=1)
    o = jax.nn.dot_product_attention(q, all_k, all_v, mask=visible[None, None])
    y = dense(d, ("heads", "embed"), name="out_proj")(o.reshape(b, length, heads * hd))
    return y, keys, values


class TitansMAC(_Titans):
  """Titans with memory as a context (§4.1); see the module docstring.

  Per segment S^(t) of `segment_size` tokens, with M_{t-1} the memory where it starts:

      h_t = M*_{t-1}(q_t),  q_t = S^(t) W_Q                      (eq 21, no write)
      y_t = Attn([p_1 ... p_Np] || h_t || S^(t))                (eqs 22-23)
      M_t = M_{t-1}(y_t)                                         (eq 24, y_t written)
      o_t = y_t ⊗ M*_t(y_t)                                      (eq 25)

  The attention is causal over the retrievals and the segment (token i sees h_j and S_j
  for j <= i) and full over the persistent tokens. Eq 25 reads, for token i, the memory
  after the writes of y_0 ... y_i (the paper's M_t at i; the chunked memory makes the
  writes of a segment parallel), so that no output depends on a later token. Segments are
  sequential (a scan over them); a sequence need not be a multiple of `segment_size`.

  Attributes:
    segment_size: C, the tokens of a segment (and of the attention's span).
    num_heads, head_dim, num_persistent_tokens, memory_depth,
      memory_expansion, rule, max_learning_rate, chunk_size, implementation, rope_base:
        see `_Titans`.
  """
  segment_size: int = 64

  def setup(self):
    self.memory = self._memory()
    self.attention = _SegmentAttention(self.num_heads, self.head_dim,
                                       self.num_persistent_tokens, self.rope_base,
                                       name="attention")
    self.gate = _OutputGate(name="gate")

  def init_state(self, batch_size: int, dim: int,
                 max_length: Optional[int] = None) -> TitansMACState:
    """The state at the start of a sequence.

    Args:
      batch_size: B.
      dim: model width D.
      max_length: unused (the state holds at most one segment); kept for the common
        interface of the Titans layers.

    Returns:
      A `TitansMACState` for [batch_size, ...] at position 0.
    """
    del max_length
    self._check_config()
    _check_positive("segment_size", self.segment_size)
    memory = self.memory.init_state(batch_size, dim)
    cache = jnp.zeros((batch_size, 2, self.segment_size, self.num_heads, self.head_dim),
                      jnp.float32)
    return TitansMACState(memory, jnp.zeros_like(memory.conv_q), memory.memory.weights,
                          cache, cache, jnp.zeros((), jnp.int32))

  def __call__(self, x: jax.Array, state: Optional[TitansMACState] = None):
    """Mixes a sequence.

    Without a state, x is a whole sequence from its start: its full segments run in a scan
    (one attention and one chunked memory update per segment), then the remainder. With a
    state, x continues where it ended (possibly inside a segment) and runs token by token,
    as decoding does.

    Args:
      x: inputs [B, T, D].
      state: None, or the `TitansMACState` after the previous tokens.

    Returns:
      `(y, state)`: outputs [B, T, D] and the state after the last token.
    """
    self._check_config()
    _check_positive("segment_size", self.segment_size)
    self._check_input(x)
    b, t, d = x.shape
    if state is not None:
      self._check_state(state, b)
      return self._run(state, x, 1)
    state = self.init_state(b, d)
    full = t - t % self.segment_size
    ys = []
    if full:
      y, state = self._run(state, x[:, :full], self.segment_size)
      ys.append(y)
    if full < t:
      state, y = self._segment(state, x[:, full:])
      ys.append(y)
    return jnp.concatenate(ys, axis=1), state

  def _check_state(self, state, batch_size: int) -> None:
    if not isinstance(state, TitansMACState):
      raise ValueError(f"state must be a TitansMACState (see init_state), got "
                       f"{type(state).__name__}")
    self._check_memory_state(state.memory, batch_size)
    want = (batch_size, 2, self.segment_size, self.num_heads, self.head_dim)
    for name in ("keys", "values"):
      got = tuple(getattr(state, name).shape)
      if got != want:
        raise ValueError(f"state.{name} must have shape [B, 2, C, H, K] = {want} (B of x, "
                         f"C = segment_size), got {got}")

  def _run(self, state: TitansMACState, x: jax.Array, piece: int):
    """`_segment` over consecutive pieces of `piece` tokens of x [B, T, D] (T % piece == 0)."""
    b, t, d = x.shape
    pieces = jnp.moveaxis(x.reshape(b, t // piece, piece, d), 1, 0)
    scan = nn.scan(lambda layer, carry, xs: layer._segment(carry, xs),
                   variable_broadcast="params", split_rngs={"params": False})
    state, ys = scan(self, state, pieces)
    return jnp.moveaxis(ys, 0, 1).reshape(b, t, d), state

  def _segment(self, state: TitansMACState, x: jax.Array):
    """Eqs 21-25 for the tokens x [B, L, D] of one segment (L <= C - state.position)."""
    position = state.position
    # M_{t-1}: the memory as the segment's first token finds it.
    start = tuple(jnp.where(position == 0, w, s)
                  for w, s in zip(state.memory.memory.weights, state.segment_start))
    h, read_conv = self.memory.read(x, start, state.read_conv)
    y, keys, values = self.attention(x, h, state.keys, state.values, position)
    m, memory = self.memory(y, state.memory)
    o = self.gate(y, m)
    position = (position + x.shape[1]) % self.segment_size
    return TitansMACState(memory, read_conv, start, keys, values, position), o


class _SlidingWindowTitans(_Titans):
  """The common frame of MAG and MAL: x~ = [persistent | x], then `_mix` over x~.

  Attributes:
    window: the attention's span (each token sees itself and `window - 1` before it);
      None is full causal attention (then init_state needs max_length).
    num_heads, head_dim, num_persistent_tokens, memory_depth,
      memory_expansion, rule, max_learning_rate, chunk_size, implementation, rope_base:
        see `_Titans`.
  """
  window: Optional[int] = 512
  # True: the persistent tokens stay visible to every token beside the window (SW-Attn*).
  persistent_always_visible: ClassVar[bool] = False

  def setup(self):
    prefix = self.num_persistent_tokens if self.persistent_always_visible else 0
    self.attention = CausalSelfAttention(num_heads=self.num_heads, head_dim=self.head_dim,
                                         window=self.window, num_prefix_tokens=prefix,
                                         rope_base=self.rope_base, name="attention")
    self.memory = self._memory()
    if self.num_persistent_tokens > 0:
      self.persistent = PersistentTokens(self.num_persistent_tokens, name="persistent")

  def init_state(self, batch_size: int, dim: int,
                 max_length: Optional[int] = None) -> TitansState:
    """The state at the start of a sequence, after the persistent tokens (eqs 26, 29).

    Args:
      batch_size: B.
      dim: model width D.
      max_length: the most tokens of a sequence; needed only with window=None.

    Returns:
      A `TitansState` for [batch_size, ...].
    """
    self._check_config()
    if self.window is not None:
      _check_positive("window", self.window)
    n_p = self.num_persistent_tokens
    length = None if max_length is None else max_length + n_p
    state = TitansState(self.attention.init_state(batch_size, length),
                        self.memory.init_state(batch_size, dim))
    if n_p > 0:
      tokens = self.persistent(dim)
      _, state = self._mix(jnp.broadcast_to(tokens, (batch_size,) + tokens.shape), state)
    return state

  def __call__(self, x: jax.Array, state: Optional[TitansState] = None):
    """Mixes a sequence.

    Args:
      x: inputs [B, T, D].
      state: None (x starts a sequence), or the `TitansState` after the previous tokens.

    Returns:
      `(y, state)`: outputs [B, T, D] (the positions of x; those of the persistent tokens
      are in the state) and the state after the last token.
    """
    self._check_input(x)
    b, t, d = x.shape
    if state is None:
      state = self.init_state(b, d, t)
    elif not isinstance(state, TitansState):
      raise ValueError(f"state must be a TitansState (see init_state), got "
                       f"{type(state).__name__}")
    else:
      self._check_memory_state(state.memory, b)
    return self._mix(x, state)


class TitansMAG(_SlidingWindowTitans):
  """Titans with memory as a gate (§4.2); see the module docstring.

      x~ = [p_1 ... p_Np] || x                                   (eq 26)
      y = SW-Attn*(x~)                                           (eq 27)
      o = y ⊗ M(x~)                                              (eq 28)

  SW-Attn* is sliding-window attention with a prefix: every token of x~ sees the
  `window - 1` tokens before it and, however far back they are, the persistent tokens
  (`CausalSelfAttention` with `num_prefix_tokens = num_persistent_tokens`). M(x~) is the
  memory layer's output per token (the memory after writing that token).

  Attributes: window and the shared ones, see `_SlidingWindowTitans`.
  """
  persistent_always_visible: ClassVar[bool] = True

  def setup(self):
    super().setup()
    self.gate = _OutputGate(name="gate")

  def _mix(self, x, state):
    y, attention = self.attention(x, state.attention)
    m, memory = self.memory(x, state.memory)
    return self.gate(y, m), TitansState(attention, memory)


class TitansMAL(_SlidingWindowTitans):
  """Titans with memory as a layer (§4.3); see the module docstring.

      x~ = [p_1 ... p_Np] || x                                   (eq 29)
      y = M(x~)                                                  (eq 30)
      o = SW-Attn(y)                                             (eq 31)

  SW-Attn is plain sliding-window attention (the paper's MAL has no prefix): once
  x~ is longer than the window, the persistent positions drop out of it.

  Attributes: window and the shared ones, see `_SlidingWindowTitans`.
  """

  def _mix(self, x, state):
    y, memory = self.memory(x, state.memory)
    o, attention = self.attention(y, state.attention)
    return o, TitansState(attention, memory)
