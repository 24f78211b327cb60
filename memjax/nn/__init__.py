"""Flax Linen modules that own parameters and call `memjax.ops`."""

from memjax.nn.associative import AssociativeMemory
from memjax.nn.associative import AssociativeMemoryState
from memjax.nn.associative import DeltaNet
from memjax.nn.associative import GatedDeltaNet
from memjax.nn.associative import LinearAttention
from memjax.nn.attention import CausalSelfAttention
from memjax.nn.conv import ShortConvolution
from memjax.nn.mlp import SwiGLU
from memjax.nn.norms import GatedRMSNorm
from memjax.nn.norms import RMSNorm
