"""The token mixers a decoder layer can use, by name, and the parser of per-layer specs.

Every mixer is a Flax module with `__call__(x, state=None) -> (y, state)` on [B, T, D]
inputs. Their `init_state` signatures differ, so each registry entry carries an adapter to
the model's one: `init_state(module, batch_size, dim, max_length)`. A mixer whose own
method is `init_state(batch_size, dim, max_length)` needs no adapter, so registering one is
one line:

    MIXERS["my_mixer"] = Mixer(lambda s: MyMixer(num_heads=s.num_heads, head_dim=s.head_dim))

Under a mesh that splits the sequence over "seq" (context parallelism), "linear",
"deltanet" and "gdn" run their memory rule context-parallel (`memjax.nn.associative`): only
states cross the "seq" devices. The other mixers have no context-parallel op; XLA
partitions them, which is correct but gathers the sequence.
"""

import dataclasses
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import flax.linen as nn

from memjax import nn as mnn
from memjax.models.hopfield_mixer import CausalHopfield
from memjax.models.specs import split_names


@dataclasses.dataclass(frozen=True)
class MixerSettings:
  """The model-wide hyperparameters a mixer builder may read.

  Attributes:
    num_heads: heads of the mixer.
    head_dim: (key) dim of each head.
    expand_v: value dim over key dim of the associative memories.
    chunk_size: chunk length of the memory ops.
    implementation: implementation of the memory ops (None: the fastest available).
    window: window of sliding-window attention (None: not set).
    memory_learning_rate: the Titans memories' ceiling of the inner learning rate theta
      (`NeuralMemory.max_learning_rate`).
  """
  num_heads: int
  head_dim: int
  expand_v: float = 1.0
  chunk_size: int = 64
  implementation: Optional[str] = None
  window: Optional[int] = None
  memory_learning_rate: float = mnn.titans.DEFAULT_MAX_LEARNING_RATE


def _own_init_state(module: nn.Module, batch_size: int, dim: int, max_length: Optional[int]):
  """The adapter of mixers whose `init_state` already has the model's signature."""
  return module.init_state(batch_size, dim, max_length)


class Mixer(NamedTuple):
  """A registered token mixer.

  Attributes:
    build: `MixerSettings -> module`; the module maps `(x [B, T, D], state=None)` to
      `(y [B, T, D], state)`.
    init_state: `(bound module, batch_size, dim, max_length) -> state` at the start of a
      sequence; `dim` is the model width D, `max_length` the most tokens the sequence will
      hold (None where the caller has none to give). Called inside `Module.apply`, so it
      may read the mixer's parameters.
  """
  build: Callable[[MixerSettings], nn.Module]
  init_state: Callable[[nn.Module, int, int, Optional[int]], Any] = _own_init_state


def _associative(cls) -> Mixer:
  return Mixer(
      build=lambda s: cls(num_heads=s.num_heads, head_dim=s.head_dim, expand_v=s.expand_v,
                          chunk_size=s.chunk_size, implementation=s.implementation),
      init_state=lambda module, batch_size, dim, max_length: module.init_state(batch_size))


def _attention(sliding: bool) -> Mixer:
  def build(s: MixerSettings) -> nn.Module:
    if sliding and s.window is None:
      raise ValueError("mixer 'swa' needs attention_window (an int >= 1), got None")
    return mnn.CausalSelfAttention(num_heads=s.num_heads, head_dim=s.head_dim,
                                   window=s.window if sliding else None)

  return Mixer(build, lambda module, batch_size, dim, max_length: module.init_state(
      batch_size, max_length))


MIXERS: Dict[str, Mixer] = {
    "attn": _attention(sliding=False),
    "swa": _attention(sliding=True),
    "linear": _associative(mnn.LinearAttention),
    "deltanet": _associative(mnn.DeltaNet),
    "gdn": _associative(mnn.GatedDeltaNet),
    "mom": _associative(mnn.MixtureOfMemories),
    # The Titans LMM keeps K = V (its MLP memory is residual), so expand_v does not apply;
    # its init_state reads the parameters (the memory's initial weights).
    "lmm": Mixer(
        lambda s: mnn.NeuralMemory(num_heads=s.num_heads, head_dim=s.head_dim,
                                   max_learning_rate=s.memory_learning_rate,
                                   chunk_size=s.chunk_size, implementation=s.implementation),
        lambda module, batch_size, dim, max_length: module.init_state(batch_size, dim)),
    # The LMM with a linear memory (Titans' depth-1 ablation): the memory whose Pallas kernel
    # implementation=None picks on a GPU or TPU, and the one context parallelism
    # (memjax.sharding.context_parallel_neural_memory) takes.
    "lmm_linear": Mixer(
        lambda s: mnn.NeuralMemory(num_heads=s.num_heads, head_dim=s.head_dim, memory_depth=1,
                                   max_learning_rate=s.memory_learning_rate,
                                   chunk_size=s.chunk_size, implementation=s.implementation),
        lambda module, batch_size, dim, max_length: module.init_state(batch_size, dim)),
    "hopfield": Mixer(lambda s: CausalHopfield(num_heads=s.num_heads, head_dim=s.head_dim)),
    # Titans' three architectures (their init_state(batch_size, dim, max_length) reads the
    # parameters). attention_window is MAC's segment (its attention span; 64 when unset)
    # and MAG's / MAL's sliding window (unset: full causal attention).
    "titans_mac": Mixer(lambda s: mnn.TitansMAC(
        num_heads=s.num_heads, head_dim=s.head_dim, segment_size=s.window or 64,
        max_learning_rate=s.memory_learning_rate, chunk_size=s.chunk_size,
        implementation=s.implementation)),
    "titans_mag": Mixer(lambda s: mnn.TitansMAG(
        num_heads=s.num_heads, head_dim=s.head_dim, window=s.window,
        max_learning_rate=s.memory_learning_rate, chunk_size=s.chunk_size,
        implementation=s.implementation)),
    "titans_mal": Mixer(lambda s: mnn.TitansMAL(
        num_heads=s.num_heads, head_dim=s.head_dim, window=s.window,
        max_learning_rate=s.memory_learning_rate, chunk_size=s.chunk_size,
        implementation=s.implementation)),
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
  return split_names(spec, MIXERS, "mixers", "mixer")
