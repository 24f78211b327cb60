"""Decoder-only language model whose per-layer token mixer comes from a spec string."""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from memjax.models.mixers import MIXERS
from memjax.models.mixers import parse_mixers
from memjax.nn import RMSNorm
from memjax.nn import SwiGLU


class DecoderBlock(nn.Module):
  """Pre-norm residual block: `x + mixer(norm(x))`, then `x + SwiGLU(norm(x))`.

  Attributes:
    mixer: the token-mixer module.
    mlp_hidden_dim: hidden width of the SwiGLU.
  """
  mixer: nn.Module
  mlp_hidden_dim: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, T, D] -> [B, T, D]."""
    y, _ = self.mixer(RMSNorm(name="mixer_norm")(x))
    x = x + y
    return x + SwiGLU(self.mlp_hidden_dim, name="mlp")(RMSNorm(name="mlp_norm")(x))


class DecoderLM(nn.Module):
  """Embedding, decoder blocks, final norm and a (tied or untied) output head.

  Attributes:
    vocab_size: number of tokens.
    d_model: width of the residual stream.
    mixers: comma-separated mixer names, one per layer, from `memjax.models.MIXERS`
      (e.g. "gdn,gdn" or "gdn,attn").
    num_heads: heads of every mixer.
    head_dim: dim of each head; d_model // num_heads when None.
    mlp_ratio: SwiGLU hidden width over d_model.
    tie_embeddings: reuse the embedding matrix as the output head.
    expand_v: value dim over key dim in the associative-memory mixers.
    attention_window: window of "swa" layers.
    chunk_size: chunk length of the memory ops.
    implementation: implementation of the memory ops (None: the fastest available).
  """
  vocab_size: int
  d_model: int = 128
  mixers: str = "gdn,gdn"
  num_heads: int = 2
  head_dim: Optional[int] = None
  mlp_ratio: float = 4.0
  tie_embeddings: bool = True
  expand_v: float = 1.0
  attention_window: Optional[int] = None
  chunk_size: int = 64
  implementation: Optional[str] = None

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Next-token logits.

    Args:
      tokens: int [B, T].

    Returns:
      float32 logits [B, T, vocab_size].
    """
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be integers [B, T], got {tokens.dtype} {tuple(tokens.shape)}")
    head_dim = self.head_dim or self.d_model // self.num_heads
    embed = nn.Embed(self.vocab_size, self.d_model, name="embed",
                     embedding_init=nn.initializers.normal(stddev=self.d_model ** -0.5))
    x = embed(tokens)
    for i, name in enumerate(parse_mixers(self.mixers)):
      mixer = MIXERS[name](self.num_heads, head_dim, expand_v=self.expand_v,
                           chunk_size=self.chunk_size, implementation=self.implementation,
                           window=self.attention_window, name=f"mixer_{i}")
      x = DecoderBlock(mixer, int(self.mlp_ratio * self.d_model), name=f"layer_{i}")(x)
    x = RMSNorm(name="final_norm")(x)
    if self.tie_embeddings:
      return embed.attend(x).astype(jnp.float32)
    return nn.Dense(self.vocab_size, use_bias=False, name="head")(x).astype(jnp.float32)
