"""Parsing of the comma-separated per-layer specs (mixers, FFNs)."""

from typing import Iterable, Tuple


def split_names(spec: str, valid: Iterable[str], field: str, noun: str) -> Tuple[str, ...]:
  """Splits `spec` ("a,b,c") into stripped names, each one of `valid`.

  Args:
    spec: the comma-separated names.
    valid: the accepted names.
    field: the attribute the spec came from, for the error message ("mixers").
    noun: what one name is, for the error message ("mixer").

  Returns:
    The names, in order.

  Raises:
    ValueError: for an empty spec or name, or an unknown name; the message lists the valid
      names.
  """
  valid = sorted(valid)
  names = tuple(name.strip() for name in spec.split(","))
  if not spec.strip() or any(not n for n in names):
    raise ValueError(f"{field} must be comma-separated names from {valid}, got {spec!r}")
  unknown = [n for n in names if n not in valid]
  if unknown:
    raise ValueError(f"unknown {noun}(s) {unknown} in {spec!r}; valid names: {valid}")
  return names
