"""Pure functions: the math of every memory rule, each with several implementations."""

from memjax.ops.delta_rule import delta_rule
from memjax.ops.delta_rule import delta_rule_step
from memjax.ops.dispatch import IMPLEMENTATIONS
from memjax.ops.linear_attention import linear_attention
from memjax.ops.linear_attention import linear_attention_step
from memjax.ops.scan import linear_scan
from memjax.ops.scan import linear_scan_step
