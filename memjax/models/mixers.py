"""The token mixers a decoder layer can use, by name, and the parser of per-layer specs."""

from typing import Callable, Dict, Tuple

import flax.linen as nn

from memjax import nn as mnn


def _associative(cls):
  def build(num_heads, head_dim, *, expand_v, chunk_size, implementation, window, name):
    del window
    return cls(num_heads=num_heads, head_dim=head_dim, expand_v=expand_v,
               chunk_size=chunk_size, implementation=implementation, name=name)
  return build


def _attention(sliding: bool):
  def build(num_heads, head_dim, *, expand_v, chunk_size, implementation, window, name):
    del expand_v, chunk_size, implementation
    if sliding and window is None:
      raise ValueError("mixer 'swa' needs attention_window (an int >= 1), got None")
    return mnn.CausalSelfAttention(num_heads=num_heads, head_dim=head_dim,
                                   window=window if sliding else None, name=name)
  return build


# name -> builder(num_heads, head_dim, *, expand_v, chunk_size, implementation, window, name)
MIXERS: Dict[str, Callable[..., nn.Module]] = {
    "attn": _attention(sliding=False),
    "swa": _attention(sliding=True),
    "linear": _associative(mnn.LinearAttention),
    "deltanet": _associative(mnn.DeltaNet),
    "gdn": _associative(mnn.GatedDeltaNet),
    "mom": _associative(mnn.MixtureOfMemories),
    # The Titans LMM keeps K = V (its MLP memory is residual), so expand_v does not apply.
    "lmm": lambda num_heads, head_dim, *, expand_v, chunk_size, implementation, window, name: (
        mnn.NeuralMemory(num_heads=num_heads, head_dim=head_dim, chunk_size=chunk_size,
                         implementation=implementation, name=name)),
}


def parse_mixers(spec: str) -> Tuple[str, ...]:
  """Splits a per-layer spec such as "gdn,attn" into mixer names, checking each.

  Args:
    spec: comma-separated mixer names, one per layer.

  Returns:
    The names, one per layer.

  Raises:
    ValueError: for an empty spec or an unknown name (the message lists the valid names).
  """
  names = tuple(name.strip() for name in spec.split(","))
  if not spec.strip() or any(not n for n in names):
    raise ValueError(f"mixers must be comma-separated names from {sorted(MIXERS)}, got {spec!r}")
  unknown = [n for n in names if n not in MIXERS]
  if unknown:
    raise ValueError(f"unknown mixer(s) {unknown} in {spec!r}; valid names: {sorted(MIXERS)}")
  return names
