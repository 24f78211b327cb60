"""Pure functions: the math of every memory rule, each with several implementations."""

from memjax.ops.delta_rule import delta_rule
from memjax.ops.delta_rule import delta_rule_step
from memjax.ops.dispatch import IMPLEMENTATIONS
from memjax.ops.linear_attention import linear_attention
from memjax.ops.linear_attention import linear_attention_step
from memjax.ops.scan import linear_scan
from memjax.ops.scan import linear_scan_step
from memjax.ops.product_keys import product_key_topk
from memjax.ops.product_keys import weighted_value_lookup
from memjax.ops.mixture_of_memories import mixture_of_memories
from memjax.ops.mixture_of_memories import mixture_of_memories_step
from memjax.ops.mixture_of_memories import top_k_routing
from memjax.ops.miras import MirasRule
from memjax.ops.titans import NeuralMemoryState
from memjax.ops.titans import neural_memory
from memjax.ops.titans import neural_memory_step
from memjax.ops.hopfield import hopfield_energy
from memjax.ops.hopfield import hopfield_masks
from memjax.ops.hopfield import hopfield_retrieval
from memjax.ops.normalizers import entmax
from memjax.ops.normalizers import softmax1
from memjax.ops.normalizers import sparsemax
