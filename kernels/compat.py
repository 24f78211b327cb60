"""The one place for Pallas API differences between the JAX versions memjax supports.

JAX 0.10.x (CPU registry installs) and 0.11.x (the GPU image) agree on everything the
kernels use today (`pl.BlockSpec(block_shape, index_map)`, `pl.pallas_call`,
`pltpu.InterpretParams`, `pltpu.CompilerParams`, `jax.experimental.pallas.triton`); the
kernels still reach these through here so that the next difference has one home.
"""

from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pl_triton


def tpu_interpret() -> pltpu.InterpretParams:
  """`interpret=` value that runs a TPU kernel body on the CPU with TPU semantics."""
  return pltpu.InterpretParams()


def tpu_params(dimension_semantics) -> pltpu.CompilerParams:
  """Mosaic TPU compiler params; `dimension_semantics` is "parallel"/"arbitrary" per grid axis."""
  return pltpu.CompilerParams(dimension_semantics=tuple(dimension_semantics))


def triton_params(num_warps: int, num_stages: int) -> pl_triton.CompilerParams:
  """Triton compiler params. Passing them pins a GPU `pallas_call` to the Triton lowering,
  whatever the `jax_pallas_use_mosaic_gpu` flag says."""
  return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
