"""The feed-forward layers a decoder layer can use, by name, and the parser of their spec.

"mlp" is the SwiGLU of every block; "pkm" puts a product-key memory in the FFN's place, as
Memory Layers at Scale (arXiv 2412.09764) does in some of its layers: the block computes
`x + ProductKeyMemory(norm(x))` with the paper's gated (`swilu`) read.
"""

import dataclasses
from typing import Callable, Dict, Optional, Tuple

import flax.linen as nn

from memjax.nn import ProductKeyMemory
from memjax.nn import ProductKeyValues
from memjax.nn import SwiGLU
from memjax.models.specs import split_names


@dataclasses.dataclass(frozen=True)
class FFNSettings:
  """The model-wide hyperparameters an FFN builder may read.

  Attributes:
    mlp_hidden_dim: hidden width of the SwiGLU.
    pkm_n_keys: sub-keys per half of a product-key memory (n_keys ** 2 value rows).
    pkm_heads: query heads of a product-key memory.
    pkm_knn: values each head selects.
    pkm_k_dim: query and key dim of each head (even).
  """
  mlp_hidden_dim: int
  pkm_n_keys: int = 32
  pkm_heads: int = 4
  pkm_knn: int = 16
  pkm_k_dim: int = 64


# name -> builder(settings, shared value table or None) -> module mapping [..., D] to [..., D].
FFNS: Dict[str, Callable[[FFNSettings, Optional[ProductKeyValues]], nn.Module]] = {
    "mlp": lambda s, values: SwiGLU(s.mlp_hidden_dim),
    "pkm": lambda s, values: ProductKeyMemory(n_keys=s.pkm_n_keys, heads=s.pkm_heads,
                                              knn=s.pkm_knn, k_dim=s.pkm_k_dim, values=values),
}


def parse_ffns(spec: str, num_layers: int) -> Tuple[str, ...]:
  """FFN names, one per layer, from one name for every layer or a comma list of them.

  Args:
    spec: e.g. "mlp" (all layers) or "mlp,pkm,mlp" (one per layer).
    num_layers: the number of layers (of the mixer spec).

  Returns:
    `num_layers` names.

  Raises:
    ValueError: for an empty or unknown name (the message lists the valid names), or a
      list whose length is neither 1 nor num_layers.
  """
  names = split_names(spec, FFNS, "ffns", "ffn")
  if len(names) == 1:
    return names * num_layers
  if len(names) != num_layers:
    raise ValueError(f"ffns {spec!r} names {len(names)} layers, but the model has "
                     f"{num_layers} (from mixers); give one name for all or one per layer")
  return names
