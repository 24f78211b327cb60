"""Pallas kernels for `memjax.ops.linear_scan`: `gpu.linear_scan` (Triton) and
`tpu.linear_scan` (Mosaic), same signature, block sizes in `common.BlockSizes`."""

from memjax.kernels.linear_scan import common
from memjax.kernels.linear_scan import gpu
from memjax.kernels.linear_scan import tpu
from memjax.kernels.linear_scan.common import BlockSizes
