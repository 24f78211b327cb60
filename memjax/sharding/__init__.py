"""Meshes, logical axis rules and context-parallel (sequence-parallel) memory ops."""

from memjax.sharding.context_parallel import context_parallel_delta_rule
from memjax.sharding.context_parallel import context_parallel_linear_attention
from memjax.sharding.context_parallel import context_parallel_linear_scan
from memjax.sharding.context_parallel import current_seq_sharding
from memjax.sharding.context_parallel_titans import context_parallel_neural_memory
from memjax.sharding.mesh import MESH_AXES
from memjax.sharding.mesh import make_mesh
from memjax.sharding.mesh import mesh_shape
from memjax.sharding.rules import DEFAULT_RULES
from memjax.sharding.rules import Rules
from memjax.sharding.rules import logical_sharding
from memjax.sharding.rules import logical_to_spec
from memjax.sharding.rules import rules_from_config
from memjax.sharding.rules import with_logical_constraint
