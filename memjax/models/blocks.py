"""The decoder block and the runs of identical blocks that are stacked with `nn.scan`."""

from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax

from memjax.models.ffns import FFNS
from memjax.models.ffns import FFNSettings
from memjax.models.mixers import MIXERS
from memjax.models.mixers import MixerSettings
from memjax.nn import ProductKeyValues
from memjax.nn import RMSNorm

# The logical axes of the residual stream [B, T, D] between blocks.
ACTIVATION_AXES = ("batch", "seq", "embed")


class DecoderBlock(nn.Module):
  """Pre-norm residual block: `x + mixer(norm(x))`, then `x + ffn(norm(x))`.

  The residual stream is constrained to `ACTIVATION_AXES` where the block takes and gives
  it: under `flax.linen.logical_axis_rules` and a mesh (`memjax.train` runs the steps so),
  it is laid out as the rules say; elsewhere the constraint does nothing.

  Attributes:
    mixer_name: a name from `memjax.models.MIXERS`.
    ffn_name: a name from `memjax.models.FFNS`.
    mixer_settings: the hyperparameters of the mixer.
    ffn_settings: the hyperparameters of the FFN.
    d_model: the model width D (for the mixers whose state depends on it).
    shared_values: a product-key value table shared with other blocks (for "pkm").
  """
  mixer_name: str
  ffn_name: str
  mixer_settings: MixerSettings
  ffn_settings: FFNSettings
  d_model: int
  shared_values: Optional[ProductKeyValues] = None

  def setup(self):
    self.mixer_norm = RMSNorm()
    self.mixer = MIXERS[self.mixer_name].build(self.mixer_settings)
    self.ffn_norm = RMSNorm()
    self.ffn = FFNS[self.ffn_name](self.ffn_settings, self.shared_values)

  def __call__(self, x: jax.Array, state: Any = None) -> Tuple[jax.Array, Any]:
    """Runs the block.

    Args:
      x: the residual stream [B, T, D].
      state: None (a whole sequence) or the mixer's state after the previous tokens.

    Returns:
      `(x, state)`: [B, T, D] and the mixer's new state (None when `state` is None).
    """
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    y, new_state = self.mixer(self.mixer_norm(x), state)
    x = x + y
    x = x + self.ffn(self.ffn_norm(x))
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    return x, None if state is None else new_state

  def init_state(self, batch_size: int, max_length: Optional[int]) -> Any:
    """The mixer's state at the start of a sequence (see `memjax.models.Mixer`)."""
    return MIXERS[self.mixer_name].init_state(self.mixer, batch_size, self.d_model, max_length)


class LayerRun(NamedTuple):
  """Consecutive layers `start .. stop - 1` that run as one module.

  Attributes:
    start, stop: the layer range.
    scanned: whether the run is one `nn.scan` over stacked parameters (leading axis
      `stop - start`) instead of a single block.
  """
  start: int
  stop: int
  scanned: bool

  @property
  def name(self) -> str:
    """`layer_<i>` for a single block, `layers_<start>_<last>` for a scanned run."""
    return f"layers_{self.start}_{self.stop - 1}" if self.scanned else f"layer_{self.start}"


def layer_runs(layers: Sequence[Tuple[str, str]], scan: bool,
               shared_values: bool) -> List[LayerRun]:
  """Groups consecutive identical (mixer, ffn) layers into runs to scan.

  A run of "pkm" layers reading a shared value table is not scanned: `nn.scan` would give
  every layer its own copy of a table that lives outside the scanned block.

  Args:
    layers: (mixer name, ffn name) per layer.
    scan: scan runs of two or more layers; False runs every layer as its own block.
    shared_values: the "pkm" layers share one value table.

  Returns:
    The runs, in layer order, covering every layer once.
  """
  runs, start = [], 0
  for i in range(1, len(layers) + 1):
    if i < len(layers) and layers[i] == layers[start]:
      continue
    scannable = scan and not (shared_values and layers[start][1] == "pkm")
    if scannable and i - start > 1:
      runs.append(LayerRun(start, i, True))
    else:
      runs.extend(LayerRun(j, j + 1, False) for j in range(start, i))
    start = i
  return runs


def scan_blocks(fn, block: DecoderBlock, length: int, carry, xs):
  """`nn.scan` of `fn(block, carry, xs) -> (carry, ys)` over `length` stacked layers.

  The block's parameters (and sown intermediates) get a leading layer axis, named "layers"
  for the logical partitioning of the parameters that carry axis names.
  """
  return nn.scan(fn, variable_axes={"params": 0, "intermediates": 0},
                 split_rngs={"params": True}, length=length,
                 metadata_params={nn.PARTITION_NAME: "layers"})(block, carry, xs)
