"""CausalHopfield: a modern Hopfield layer used as a causal token mixer.

Self-association (Ramsauer et al., arXiv 2008.02217): the tokens of the sequence are at once
the stored patterns, the state patterns and the pattern projections of a
`memjax.nn.Hopfield` layer, and an association mask lets token t retrieve only from
tokens <= t, which makes the mixer causal. It has no position encoding: order reaches it
only through the mask (and the other layers of the model).

Decoding caches the mixer's inputs (not projected keys: the Hopfield layer normalises and
projects its stored patterns inside), so each step re-projects the cache, O(max_length * D
* H * K) per token.
"""

from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from memjax.nn.attention import check_cache_room
from memjax.nn.hopfield import Hopfield


class HopfieldMixerState(NamedTuple):
  """Decoding cache of a `CausalHopfield` mixer.

  Attributes:
    inputs: the inputs [B, C, D] of the tokens seen so far (token p in slot p; C =
      max_length).
    position: int32 scalar, the number of tokens seen so far.
  """
  inputs: jax.Array
  position: jax.Array


class CausalHopfield(nn.Module):
  """Causal self-association through a multi-head `Hopfield` layer (one update step).

  One update keeps every token's retrieval independent of the later tokens: with more
  steps, the Hopfield layer's stopping rule looks at a head's whole association, later
  tokens included.

  Under a mesh that splits the sequence over "seq", it has no context-parallel form: XLA
  partitions it, which is correct but gathers the sequence.

  Attributes:
    num_heads: Hopfield heads H.
    head_dim: depth K of each head's Hopfield space.
    normalizer: "softmax", "sparsemax", "entmax" or "softmax1" (see `memjax.nn.Hopfield`).
    implementation: passed to `memjax.ops.hopfield_retrieval`.
  """
  num_heads: int = 4
  head_dim: int = 64
  normalizer: str = "softmax"
  implementation: Optional[str] = None

  def setup(self):
    self.hopfield = Hopfield(num_heads=self.num_heads, hidden_size=self.head_dim,
                             normalizer=self.normalizer, implementation=self.implementation)

  def init_state(self, batch_size: int, dim: int, max_length: Optional[int],
                 dtype=jnp.float32) -> HopfieldMixerState:
    """An empty cache of `max_length` inputs of width `dim`, at position 0."""
    if not isinstance(max_length, int) or max_length < 1:
      raise ValueError("init_state of the Hopfield mixer needs max_length (an int >= 1, the "
                       f"most tokens the sequence will hold), got {max_length!r}")
    return HopfieldMixerState(jnp.zeros((batch_size, max_length, dim), dtype),
                              jnp.zeros((), jnp.int32))

  def __call__(self, x: jax.Array, state: Optional[HopfieldMixerState] = None):
    """Mixes a whole sequence, or continues one from a cache.

    Overflow behaves as in `memjax.nn.CausalSelfAttention`: a ValueError where it can be
    seen (T > max_length, or a concrete position), NaN outputs past max_length under jit.

    Args:
      x: inputs [B, T, D], T >= 1.
      state: None (a whole sequence from position 0, nothing cached) or the
        `HopfieldMixerState` after the previous tokens.

    Returns:
      `(y, state)`: outputs [B, T, D] and the updated state (None when `state` is None).
    """
    if x.ndim != 3 or x.shape[1] < 1:
      raise ValueError(f"x must have shape [B, T, D] with T >= 1, got {tuple(x.shape)}")
    b, t, d = x.shape
    if state is None:
      future = jnp.triu(jnp.ones((t, t), bool), k=1)  # True blocks an association.
      return self.hopfield(x, association_mask=future), None
    if not isinstance(state, HopfieldMixerState):
      raise ValueError(f"state must be a HopfieldMixerState (see init_state), got "
                       f"{type(state).__name__}")
    if state.inputs.ndim != 3 or state.inputs.shape[::2] != (b, d):
      raise ValueError(f"state.inputs must have shape [B, C, D] = [{b}, C, {d}] (B, D of x "
                       f"{tuple(x.shape)}), got {tuple(state.inputs.shape)}")
    capacity = state.inputs.shape[1]
    check_cache_room(state.position, t, capacity)
    positions = state.position + jnp.arange(t, dtype=jnp.int32)
    # mode="drop": a token past the end is not written (clamping would overwrite others).
    inputs = state.inputs.at[:, positions].set(x.astype(state.inputs.dtype), mode="drop")
    cached = inputs.astype(x.dtype)
    future = jnp.arange(capacity)[None, :] > positions[:, None]  # [T, C]; empty slots too.
    y = self.hopfield((cached, x, cached), association_mask=future)
    y = jnp.where((positions < capacity)[None, :, None], y, jnp.nan)
    return y, HopfieldMixerState(inputs, state.position + t)
