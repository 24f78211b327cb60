"""Parameter counts of a model, per module and per layer, as a printable table."""

import re
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np

from memjax.models.decoder import DecoderLM

# A scanned run of DecoderLM layers: its leaves have a leading axis of last - first + 1.
SCANNED_RUN = re.compile(r"layers_(\d+)_(\d+)$")
_LAYER = re.compile(r"layers?_(\d+)")


def _count(leaf) -> int:
  # Leaves may be arrays or jax.ShapeDtypeStruct (from jax.eval_shape): only shapes count.
  return int(np.prod(leaf.shape, dtype=np.int64))


def _module_counts(params: Any, depth: int) -> Dict[Tuple[str, ...], int]:
  """Parameters under every module path of at most `depth` names."""
  counts: Dict[Tuple[str, ...], int] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    # Dict keys name modules and parameters; other entries (e.g. the `value` of Flax's
    # partitioning boxes) are not part of the name.
    names = tuple(str(entry.key) for entry in path
                  if isinstance(entry, jax.tree_util.DictKey))
    for level in range(1, min(depth, len(names) - 1) + 1):
      counts[names[:level]] = counts.get(names[:level], 0) + _count(leaf)
  return counts


def _order(path: Tuple[str, ...]):
  """embed, then layers by their first layer, then the rest; children alphabetically."""
  top = path[0]
  layer = _LAYER.match(top)
  key = (0,) if top == "embed" else (1, int(layer.group(1))) if layer else (2, top)
  return key + path[1:]


def parameter_summary(params: Any, depth: int = 2, model: Optional[DecoderLM] = None) -> str:
  """A table of parameter counts per module, down to `depth` levels, and their total.

  Rows of a scanned run of DecoderLM layers (`layers_<first>_<last>`) also give the count
  per layer.

  Args:
    params: a parameter pytree of nested dicts (e.g. `variables["params"]`, or the shapes
      from `jax.eval_shape(model.init, ...)["params"]`); a variables dict holding only
      "params" is also accepted.
    depth: module levels to list (1: top-level modules only).
    model: the DecoderLM of `params`, to label each layer row with its mixer and FFN.

  Returns:
    The table, one module per line, indented by level, ending with the total.
  """
  if not isinstance(depth, int) or depth < 1:
    raise ValueError(f"depth must be an int >= 1, got {depth!r}")
  if isinstance(params, dict) and set(params) == {"params"}:
    params = params["params"]
  counts = _module_counts(params, depth)
  total = sum(_count(leaf) for leaf in jax.tree_util.tree_leaves(params))
  rows = [("module", "params", "per layer")]
  for path in sorted(counts, key=_order):
    name = "  " * (len(path) - 1) + path[-1]
    run = SCANNED_RUN.match(path[0])
    layer = _LAYER.match(path[0])
    if layer and model is not None and len(path) == 1:
      name += " ({} + {})".format(*model.layers[int(layer.group(1))])
    per_layer = ""
    if run:
      layers = int(run.group(2)) - int(run.group(1)) + 1
      per_layer = f"{counts[path] // layers:,}"
      if len(path) == 1:
        name += f" x {layers}, scanned"
    rows.append((name, f"{counts[path]:,}", per_layer))
  rows.append(("total", f"{total:,}", ""))
  width = max(len(row[0]) for row in rows)
  return "\n".join(f"{a:<{width}}  {b:>13}  {c:>11}".rstrip() for a, b, c in rows)
