"""Flax Linen modules that own parameters and call `memjax.ops`."""

from memjax.nn.associative import AssociativeMemory
from memjax.nn.associative import AssociativeMemoryState
from memjax.nn.associative import DeltaNet
from memjax.nn.associative import GatedDeltaNet
from memjax.nn.associative import LinearAttention
from memjax.nn.attention import AttentionState
from memjax.nn.attention import CausalSelfAttention
from memjax.nn.conv import ShortConvolution
from memjax.nn.mlp import SwiGLU
from memjax.nn.norms import GatedRMSNorm
from memjax.nn.norms import RMSNorm
from memjax.nn.product_keys import ProductKeyMemory
from memjax.nn.product_keys import ProductKeyValues
from memjax.nn.mixture_of_memories import MixtureOfMemories
from memjax.nn.mixture_of_memories import MixtureOfMemoriesState
from memjax.nn.hopfield import Hopfield
from memjax.nn.hopfield import HopfieldLayer
from memjax.nn.hopfield import HopfieldPooling
from memjax.nn.titans import NeuralMemory
from memjax.nn.titans import NeuralMemoryLayerState
from memjax.nn.titans_architectures import TitansMAC
from memjax.nn.titans_architectures import TitansMACState
from memjax.nn.titans_architectures import TitansMAG
from memjax.nn.titans_architectures import TitansMAL
from memjax.nn.titans_architectures import TitansState
