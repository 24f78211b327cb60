"""Causal softmax attention (optionally sliding-window) with rotary position embeddings.

Whole sequences run through `jax.nn.dot_product_attention` with its causal (and local
window) mask. A sliding window may keep the first `num_prefix_tokens` tokens of the
sequence visible to every token (the SW-Attn* of Titans, arXiv 2501.00663 §4.2): token i
sees token j <= i when i - j < window or j < num_prefix_tokens. Decoding keeps a KV cache
in an explicit `AttentionState`:

    state = layer.init_state(batch_size, max_length)       # full attention
    state = layer.init_state(batch_size)                   # window: O(prefix + window)
    y, state = layer.apply(params, prompt, state)          # prefill, any length
    y, state = layer.apply(params, next_token, state)      # one-token steps

Full attention caches the rotary-applied keys and values of token `p` in slot `p` of a
`max_length` cache. Sliding-window attention with P = `num_prefix_tokens` caches the prefix
token `p < P` in slot `p`, never overwritten, and the last `window - 1` later tokens in a
ring buffer after it (token `p >= P` in slot `P + (p - P) mod (window - 1)`): those are all
a later token can see.

Parameters: `qkv_proj` [D, 3, H, K] with logical axes ("embed", None, "heads", None), so
tensor parallelism gives each device the q, k and v of whole heads, and `out_proj`
[H * K, D] ("heads", "embed").

Under a mesh that splits the sequence over "seq", attention has no context-parallel form
here (no ring attention): XLA partitions it, which is correct but gathers the keys and
values of the whole sequence onto each device.
"""

from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from memjax.nn.partitioning import dense
from memjax.nn.partitioning import split_dense


class AttentionState(NamedTuple):
  """KV cache of a `CausalSelfAttention` layer (C cache slots).

  Attributes:
    keys: rotary-applied keys [B, C, H, K] of the cached tokens.
    values: values [B, C, H, K] of the cached tokens.
    position: int32 scalar, the number of tokens seen so far (the position of the next
      token); shared by the batch.
  """
  keys: jax.Array
  values: jax.Array
  position: jax.Array


def rotary_embedding(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotates pairs of channels of x by position-dependent angles (RoPE, half-split form).

  Args:
    x: [B, T, H, D] with D even.
    positions: [T] integer positions.
    base: the wavelength base.

  Returns:
    [B, T, H, D] in the dtype of `x`.
  """
  half = x.shape[-1] // 2
  freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[:, None] * freqs  # [T, D/2]
  cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def check_cache_room(position: jax.Array, num_tokens: int, capacity: int) -> None:
  """Raises ValueError where a cache of `capacity` tokens cannot take `num_tokens` more.

  `num_tokens > capacity` is always checked (shapes are static); the position only when it
  is concrete (outside jit).
  """
  if num_tokens > capacity:
    raise ValueError(f"x has T={num_tokens} tokens but the cache holds "
                     f"max_length={capacity}")
  if not isinstance(position, jax.core.Tracer) and int(position) + num_tokens > capacity:
    raise ValueError(f"{num_tokens} more tokens after position {int(position)} overflow the "
                     f"cache of max_length={capacity}; init_state with a larger max_length")


class CausalSelfAttention(nn.Module):
  """Multi-head causal softmax attention through `jax.nn.dot_product_attention`.

  Attributes:
    num_heads: number of heads.
    head_dim: dim of each head's queries, keys and values (even, for RoPE).
    window: if set, each token attends to itself and the `window - 1` tokens before it
      (sliding-window attention); None attends to all tokens before it.
    num_prefix_tokens: P, the first tokens of the sequence (positions 0 ... P - 1, counted
      from its start, cached tokens included) that every later token sees besides its
      window. Changes nothing without a window.
    rope_base: wavelength base of the rotary embeddings.
  """
  num_heads: int = 4
  head_dim: int = 64
  window: Optional[int] = None
  num_prefix_tokens: int = 0
  rope_base: float = 10000.0

  def _check_config(self) -> None:
    if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
      raise ValueError(f"window must be None or an int >= 1, got {self.window!r}")
    p = self.num_prefix_tokens
    if not isinstance(p, int) or isinstance(p, bool) or p < 0:
      raise ValueError(f"num_prefix_tokens must be an int >= 0, got {p!r}")

  def init_state(self, batch_size: int, max_length: Optional[int] = None,
                 dtype=jnp.float32) -> AttentionState:
    """An empty KV cache, at position 0.

    Args:
      batch_size: B.
      max_length: the most tokens a sequence may hold (prompt and generated tokens) with
        full attention; ignored with a window, whose cache holds
        `num_prefix_tokens + window - 1` tokens.
      dtype: dtype of the cached keys and values.

    Returns:
      An `AttentionState` with zero keys and values [B, C, H, K] (C = max_length, or
      num_prefix_tokens + window - 1) and position 0.
    """
    self._check_config()
    if self.window is None:
      if max_length is None:
        raise ValueError("init_state of full attention (window=None) needs max_length, the "
                         "most tokens the sequence will hold; got None")
      if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be an int >= 1, got {max_length!r}")
      capacity = max_length
    else:
      capacity = self.num_prefix_tokens + self.window - 1
    shape = (batch_size, capacity, self.num_heads, self.head_dim)
    return AttentionState(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                          jnp.zeros((), jnp.int32))

  @nn.compact
  def __call__(self, x: jax.Array, state: Optional[AttentionState] = None):
    """Attends over a whole sequence, or continues one from a KV cache.

    Without a state, `x` is a whole sequence starting at position 0 and nothing is cached.
    With a state, `x` holds the tokens at positions `state.position, ...`; they attend to
    the cached tokens and to each other (causally, within the window and the prefix) and
    are cached.

    Overflow: full attention caches `max_length` tokens. A call with more tokens than that
    raises a ValueError; so does one that would pass max_length when `state.position` is
    concrete (outside jit). Under jit the position is traced and cannot be checked: the
    outputs of tokens at positions >= max_length are NaN (never silently wrong).

    Args:
      x: inputs [B, T, D], T >= 1.
      state: None, or the `AttentionState` after the previous tokens (`init_state`).

    Returns:
      `(y, state)`: outputs [B, T, D] and the updated state (None when `state` is None).
    """
    if x.ndim != 3 or x.shape[1] < 1:
      raise ValueError(f"x must have shape [B, T, D] with T >= 1, got {tuple(x.shape)}")
    self._check_config()
    b, t, d = x.shape
    h, hd = self.num_heads, self.head_dim
    if state is not None:
      self._check_state(state, b)
    qkv = split_dense(d, (3, h, hd), ("embed", None, "heads", None), name="qkv_proj")(x)
    start = 0 if state is None else state.position
    positions = start + jnp.arange(t, dtype=jnp.int32)
    q = rotary_embedding(qkv[:, :, 0], positions, self.rope_base)
    k = rotary_embedding(qkv[:, :, 1], positions, self.rope_base)
    v = qkv[:, :, 2]
    if state is None and (self.window is None or self.num_prefix_tokens == 0):
      window = None if self.window is None else (self.window - 1, 0)
      o = jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=window)
    elif state is None:
      mask = self._visible(positions, positions)
      o = jax.nn.dot_product_attention(q, k, v, mask=mask[None, None])
    elif self.window is None:
      o, state = self._attend_full_cache(q, k, v, positions, state)
    else:
      o, state = self._attend_ring_cache(q, k, v, positions, state)
    return dense(d, ("heads", "embed"), name="out_proj")(o.reshape(b, t, h * hd)), state

  def _check_state(self, state: AttentionState, batch_size: int) -> None:
    """Raises ValueError unless `state` fits this layer and a batch of `batch_size`."""
    if not isinstance(state, AttentionState):
      raise ValueError(f"state must be an AttentionState (see init_state), got "
                       f"{type(state).__name__}")
    capacity = state.keys.shape[1] if state.keys.ndim == 4 else None
    want_capacity = (capacity if self.window is None
                     else self.num_prefix_tokens + self.window - 1)
    want = (batch_size, want_capacity, self.num_heads, self.head_dim)
    for name in ("keys", "values"):
      got = tuple(getattr(state, name).shape)
      if got != want:
        raise ValueError(
            f"state.{name} must have shape [B, C, H, K] = {want} (B of x, C = "
            f"{'max_length' if self.window is None else 'num_prefix_tokens + window - 1'}"
            f"), got {got}")
    if jnp.shape(state.position) != ():
      raise ValueError(f"state.position must be a scalar, got shape "
                       f"{jnp.shape(state.position)}")

  def _attend_full_cache(self, q, k, v, positions, state):
    """Writes the new tokens into slots `positions` and attends over the whole cache."""
    t, capacity = q.shape[1], state.keys.shape[1]
    check_cache_room(state.position, t, capacity)
    # mode="drop": a token past the end is not written (clamping would overwrite others).
    keys = state.keys.at[:, positions].set(k.astype(state.keys.dtype), mode="drop")
    values = state.values.at[:, positions].set(v.astype(state.values.dtype), mode="drop")
    # Slot s holds token s; slots past the newest token are empty and masked with the future.
    mask = jnp.arange(capacity)[None, :] <= positions[:, None]  # [T, C]
    o = jax.nn.dot_product_attention(q, keys.astype(q.dtype), values.astype(q.dtype),
                                     mask=mask[None, None])
    o = jnp.where((positions < capacity)[None, :, None, None], o, jnp.nan)
    return o, AttentionState(keys, values, state.position + t)

  def _visible(self, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
    """[T, S] mask of the keys at `key_positions` [S] (negative: an empty slot) that the
    queries at `query_positions` [T] see: causal, within the window or the prefix."""
    offset = query_positions[:, None] - key_positions[None, :]
    near = (offset < self.window) | (key_positions[None, :] < self.num_prefix_tokens)
    return (key_positions[None, :] >= 0) & (offset >= 0) & near

  def _attend_ring_cache(self, q, k, v, positions, state):
    """Attends over the cache and the new tokens, then caches the prefix tokens among them
    and the last window - 1 tokens after the prefix."""
    t, n_p, size = q.shape[1], self.num_prefix_tokens, self.window - 1
    p = state.position
    # Slot s < n_p holds token s once it is cached; slot n_p + s the latest token p' in
    # [n_p, p) with (p' - n_p) mod size = s. Position -1: an empty slot.
    prefix_positions = jnp.arange(n_p, dtype=jnp.int32)
    prefix_positions = jnp.where(prefix_positions < p, prefix_positions, -1)
    ring_positions = p - 1 - jnp.mod(p - 1 - n_p - jnp.arange(size, dtype=jnp.int32),
                                     max(size, 1))
    ring_positions = jnp.where(ring_positions >= n_p, ring_positions, -1)
    key_positions = jnp.concatenate([prefix_positions, ring_positions, positions])
    keys = jnp.concatenate([state.keys.astype(k.dtype), k], axis=1)
    values = jnp.concatenate([state.values.astype(v.dtype), v], axis=1)
    mask = self._visible(positions, key_positions)
    o = jax.nn.dot_product_attention(q, keys, values, mask=mask[None, None])
    # A new token is cached if it is in the prefix, or among the last `size` new tokens
    # (the ones the next token can still see); the others go to slot n_p + size and are
    # dropped. Cached slots are distinct, so the scatter has no collisions.
    last = jnp.arange(t) >= t - size
    ring_slots = n_p + jnp.mod(positions - n_p, max(size, 1))
    slots = jnp.where(positions < n_p, positions, jnp.where(last, ring_slots, n_p + size))
    new_keys = state.keys.at[:, slots].set(k.astype(state.keys.dtype), mode="drop")
    new_values = state.values.at[:, slots].set(v.astype(state.values.dtype), mode="drop")
    return o, AttentionState(new_keys, new_values, p + t)
