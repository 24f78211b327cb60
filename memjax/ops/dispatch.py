"""Choice of implementation for the ops in `memjax.ops`.

Every op has up to three implementations behind one signature:

* ``"reference"`` — a step-by-step ``lax.scan`` that reads like the paper's equation;
* ``"xla"`` — the chunkwise-parallel (matmul) form, compiled by XLA;
* ``"pallas"`` — a Pallas kernel, where one exists for the platform.

``implementation=None`` picks the fastest one registered for the op, in the order of
`PREFERENCE`, skipping ``"pallas"`` unless the default backend compiles Pallas kernels
(GPU or TPU; see `pallas_compiles`), and skipping it too where the op reports the kernel
measured slower than its xla form for the call, or not yet measured (`pallas_slower`). An
explicit ``"pallas"`` on a CPU runs the kernel body in the Pallas interpreter: slow, but
the real kernel. Asking for an implementation the op does not have is a `ValueError`.
"""

from typing import Callable, Mapping, Optional

import jax

IMPLEMENTATIONS = ("reference", "xla", "pallas")
# Fastest first: what `implementation=None` tries, in order.
PREFERENCE = ("pallas", "xla", "reference")


def pallas_compiles() -> bool:
  """Whether Pallas kernels compile for the default backend (else they only interpret)."""
  return jax.default_backend() in ("gpu", "tpu")


def choose(
    op_name: str,
    implementation: Optional[str],
    available: Mapping[str, Callable],
    pallas_unsupported: Optional[str] = None,
    pallas_slower: Optional[str] = None,
) -> Callable:
  """Returns the function implementing `op_name` for the requested implementation.

  Args:
    op_name: name of the op, used in error messages.
    implementation: one of `IMPLEMENTATIONS`, or None for the fastest available.
    available: the implementations this op has, by name.
    pallas_unsupported: why the kernel cannot take this call's shapes or dtypes, or None
      if it can. `implementation=None` then falls back to the next implementation; an
      explicit "pallas" raises a ValueError with this reason.
    pallas_slower: why the kernel, though it can take this call, is slower than the next
      implementation on this backend (or not yet shown faster), or None.
      `implementation=None` then skips it; an explicit "pallas" still runs it.

  Returns:
    The chosen implementation's function.

  Raises:
    ValueError: if `implementation` is unknown or not available for this op.
  """
  if implementation is None:
    for name in PREFERENCE:
      if name in available and (
          name != "pallas" or (pallas_compiles() and pallas_unsupported is None
                               and pallas_slower is None)):
        return available[name]
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"{op_name}: implementation must be one of {IMPLEMENTATIONS} or None, got "
        f"{implementation!r}")
  if implementation not in available:
    raise ValueError(
        f"{op_name}: implementation={implementation!r} is not available; this op has "
        f"{tuple(n for n in IMPLEMENTATIONS if n in available)}")
  if implementation == "pallas" and pallas_unsupported is not None:
    raise ValueError(f"{op_name}: implementation='pallas' {pallas_unsupported}")
  return available[implementation]
