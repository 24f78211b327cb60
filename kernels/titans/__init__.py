"""Pallas kernels for `memjax.ops.neural_memory` (the "titans" rule).

`chunked.memory_loop` (linear memory: `gpu` Triton, `tpu` Mosaic; block sizes in
`common.BlockSizes`) and `chunked.mlp_memory_loop` (MLP memory: `mlp_gpu`, `mlp_tpu`) are
the differentiable entry points for either chip's kernels.
"""

from memjax.kernels.titans import chunked
from memjax.kernels.titans import common
from memjax.kernels.titans import gpu
from memjax.kernels.titans import mlp_common
from memjax.kernels.titans import mlp_gpu
from memjax.kernels.titans import mlp_tpu
from memjax.kernels.titans import tpu
from memjax.kernels.titans.common import BlockSizes
