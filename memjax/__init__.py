"""memjax: neural memory modules for JAX and Flax.

Subpackages: `ops` (pure functions of every memory rule), `nn` (Flax modules), `models`
(decoders from a per-layer mixer spec), `data` (synthetic tasks and input pipelines),
`sharding` (meshes, logical axis rules, context-parallel memory ops) and `train` (train
state, steps, checkpoints, the training loop).
"""

__version__ = "0.1.0"

from memjax import data
from memjax import models
from memjax import nn
from memjax import ops
from memjax import sharding
from memjax import train
from memjax.ops import delta_rule
from memjax.ops import delta_rule_step
from memjax.ops import linear_attention
from memjax.ops import linear_attention_step
from memjax.ops import linear_scan
from memjax.ops import linear_scan_step
