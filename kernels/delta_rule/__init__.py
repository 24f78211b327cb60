"""Pallas kernels for `memjax.ops.delta_rule` and `memjax.ops.linear_attention`.

`chunked.delta_rule` is the differentiable entry point for either chip's passes
(`gpu`: Triton, `tpu`: Mosaic; block sizes in `common.BlockSizes`).
"""

from memjax.kernels.delta_rule import chunked
from memjax.kernels.delta_rule import common
from memjax.kernels.delta_rule import gpu
from memjax.kernels.delta_rule import tpu
from memjax.kernels.delta_rule.common import BlockSizes
