"""Pallas kernels for `memjax.ops.neural_memory` (linear memory, Titans rule).

`chunked.memory_loop` is the differentiable entry point for either chip's kernels
(`gpu`: Triton, `tpu`: Mosaic; block sizes in `common.BlockSizes`).
"""

from memjax.kernels.titans import chunked
from memjax.kernels.titans import common
from memjax.kernels.titans import gpu
from memjax.kernels.titans import tpu
from memjax.kernels.titans.common import BlockSizes
