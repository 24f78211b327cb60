"""Decoder-only language model built from per-layer mixer and FFN specs.

    model = DecoderLM(vocab_size=256, mixers="gdn,gdn,gdn,attn", ffns="mlp,pkm,mlp,mlp")
    params = model.init(key, tokens)["params"]
    logits = model.apply({"params": params}, tokens)                       # training

    state = model.apply({"params": params}, batch_size, max_length,
                        method=DecoderLM.init_state)
    logits, state = model.apply({"params": params}, prompt, state, method=DecoderLM.decode)
    logits, state = model.apply({"params": params}, next_token, state,
                                method=DecoderLM.decode)

Consecutive identical (mixer, ffn) layers are one `nn.scan` over stacked parameters (see
`memjax.models.blocks.layer_runs`), so compile time does not grow with their number.
Parameters: `embed`, then per run `layer_<i>` (one block) or `layers_<first>_<last>` (a
scanned run, every leaf with a leading layer axis), `final_norm`, `head` (untied only) and
`pkm_values` (a shared product-key table only).

Every parameter carries logical axis names (see `memjax.nn.partitioning`): the embedding
[V, D] is (None, "embed") and the untied head [D, V] ("embed", None), so the vocabulary is
never split; a scanned run's leading layer axis is "layers". `init` returns them boxed;
`flax.linen.unbox` gives plain arrays, and `apply` takes either.
"""

from typing import Any, List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from memjax.models.blocks import DecoderBlock
from memjax.models.blocks import LayerRun
from memjax.models.blocks import layer_runs
from memjax.models.blocks import scan_blocks
from memjax.models.ffns import FFNSettings
from memjax.models.ffns import parse_ffns
from memjax.models.mixers import MixerSettings
from memjax.models.mixers import parse_mixers
from memjax.nn import ProductKeyValues
from memjax.nn import RMSNorm
from memjax.nn.partitioning import dense
from memjax.nn.partitioning import partitioned
from memjax.nn.titans import DEFAULT_MAX_LEARNING_RATE

# One entry per layer run: the mixer state of a single block, or the states of a scanned
# run's blocks stacked on a leading layer axis.
DecoderState = Tuple[Any, ...]


class DecoderLM(nn.Module):
  """Embedding, decoder blocks, final norm and a (tied or untied) output head.

  Attributes:
    vocab_size: number of tokens.
    d_model: width of the residual stream.
    mixers: comma-separated mixer names, one per layer, from `memjax.models.MIXERS`
      (e.g. "gdn,gdn" or "gdn,attn").
    ffns: FFN names from `memjax.models.FFNS` ("mlp", "pkm"): one for every layer, or a
      comma list with one per layer.
    num_heads: heads of every mixer.
    head_dim: dim of each head; d_model // num_heads when None.
    mlp_ratio: SwiGLU hidden width over d_model.
    tie_embeddings: reuse the embedding matrix as the output head.
    expand_v: value dim over key dim in the associative-memory mixers.
    attention_window: window of "swa" layers.
    chunk_size: chunk length of the memory ops.
    implementation: implementation of the memory ops (None: the fastest available).
    memory_learning_rate: ceiling of the inner learning rate theta of the Titans memory
      mixers ("lmm", "lmm_linear", "titans_*").
    pkm_n_keys, pkm_heads, pkm_knn, pkm_k_dim: the product-key memories of "pkm" layers
      (n_keys ** 2 value rows, query heads, values selected per head, key dim).
    pkm_shared_values: all "pkm" layers read one value table (`pkm_values`).
    scan_layers: run consecutive identical layers as one `nn.scan`; False gives every
      layer its own module `layer_<i>` (same math, compile time grows with depth).
  """
  vocab_size: int
  d_model: int = 128
  mixers: str = "gdn,gdn"
  ffns: str = "mlp"
  num_heads: int = 2
  head_dim: Optional[int] = None
  mlp_ratio: float = 4.0
  tie_embeddings: bool = True
  expand_v: float = 1.0
  attention_window: Optional[int] = None
  chunk_size: int = 64
  implementation: Optional[str] = None
  memory_learning_rate: float = DEFAULT_MAX_LEARNING_RATE
  pkm_n_keys: int = 32
  pkm_heads: int = 4
  pkm_knn: int = 16
  pkm_k_dim: int = 64
  pkm_shared_values: bool = False
  scan_layers: bool = True

  @property
  def layers(self) -> Tuple[Tuple[str, str], ...]:
    """(mixer name, ffn name) of every layer; ValueError for a bad spec."""
    mixers = parse_mixers(self.mixers)
    return tuple(zip(mixers, parse_ffns(self.ffns, len(mixers))))

  def _shares_values(self) -> bool:
    return self.pkm_shared_values and any(ffn == "pkm" for _, ffn in self.layers)

  def runs(self) -> List[LayerRun]:
    """The layer runs, one module each (see `memjax.models.blocks.layer_runs`)."""
    return layer_runs(self.layers, self.scan_layers, self._shares_values())

  def setup(self):
    layers = self.layers
    self.embed = nn.Embed(self.vocab_size, self.d_model, embedding_init=partitioned(
        nn.initializers.normal(stddev=self.d_model ** -0.5), (None, "embed")))
    self.pkm_values = (ProductKeyValues(self.pkm_n_keys ** 2, self.d_model)
                       if self._shares_values() else None)
    mixer_settings = MixerSettings(
        num_heads=self.num_heads, head_dim=self.head_dim or self.d_model // self.num_heads,
        expand_v=self.expand_v, chunk_size=self.chunk_size,
        implementation=self.implementation, window=self.attention_window,
        memory_learning_rate=self.memory_learning_rate)
    ffn_settings = FFNSettings(
        mlp_hidden_dim=int(self.mlp_ratio * self.d_model), pkm_n_keys=self.pkm_n_keys,
        pkm_heads=self.pkm_heads, pkm_knn=self.pkm_knn, pkm_k_dim=self.pkm_k_dim)
    self.blocks = tuple(
        DecoderBlock(*layers[run.start], mixer_settings, ffn_settings, self.d_model,
                     shared_values=self.pkm_values if layers[run.start][1] == "pkm" else None,
                     name=run.name)
        for run in self.runs())
    self.final_norm = RMSNorm()
    if not self.tie_embeddings:
      self.head = dense(self.vocab_size, ("embed", None))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Next-token logits of whole sequences.

    Args:
      tokens: int [B, T].

    Returns:
      float32 logits [B, T, vocab_size].
    """
    return self._forward(tokens, None)[0]

  def init_state(self, batch_size: int, max_length: Optional[int] = None) -> DecoderState:
    """The decoding state at the start of a sequence.

    Call it through `apply` (the Titans memory's initial state is a parameter):
    `model.apply({"params": params}, batch_size, max_length, method=DecoderLM.init_state)`.

    Args:
      batch_size: B.
      max_length: the most tokens the sequence will hold (prompt and generated); needed
        by the "attn" and "hopfield" mixers, whose caches hold every token.

    Returns:
      One state per layer run (see `DecoderState`).
    """
    states = []
    for run, block in zip(self.runs(), self.blocks):
      if run.scanned:
        init = lambda blk, carry, _: (carry, blk.init_state(batch_size, max_length))
        states.append(scan_blocks(init, block, run.stop - run.start, None, None)[1])
      else:
        states.append(block.init_state(batch_size, max_length))
    return tuple(states)

  def decode(self, tokens: jax.Array, state: DecoderState) -> Tuple[jax.Array, DecoderState]:
    """Continues sequences from a decoding state: a prompt (prefill) or the next tokens.

    A prefill followed by one-token calls gives the logits of the whole sequence. Past
    the `max_length` of `init_state`, attention and Hopfield layers raise a ValueError
    where they can see it and give NaN logits under jit (see `CausalSelfAttention`).

    Args:
      tokens: int [B, T], T >= 1, the tokens after those the state has seen.
      state: from `init_state` or the previous `decode`.

    Returns:
      `(logits, state)`: float32 [B, T, vocab_size] and the state after the tokens.
    """
    runs = self.runs()
    if not isinstance(state, tuple) or len(state) != len(runs):
      raise ValueError(
          f"state must be the tuple init_state returns, one entry per layer run "
          f"{[run.name for run in runs]}, got a {type(state).__name__} of "
          f"{len(state) if isinstance(state, (tuple, list)) else 'no'} entries")
    return self._forward(tokens, state)

  def _forward(self, tokens, state):
    """Embedding, blocks and head; `state` None runs whole sequences and returns None."""
    if tokens.ndim != 2 or tokens.shape[1] < 1 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be integers [B, T] with T >= 1, got {tokens.dtype} "
                       f"{tuple(tokens.shape)}")
    x = self.embed(tokens)
    new_states = []
    for i, (run, block) in enumerate(zip(self.runs(), self.blocks)):
      layer_state = None if state is None else state[i]
      if run.scanned:
        step = lambda blk, carry, xs: blk(carry, xs)
        x, layer_state = scan_blocks(step, block, run.stop - run.start, x, layer_state)
      else:
        x, layer_state = block(x, layer_state)
      new_states.append(layer_state)
    x = self.final_norm(x)
    logits = self.embed.attend(x) if self.tie_embeddings else self.head(x)
    return logits.astype(jnp.float32), None if state is None else tuple(new_states)
