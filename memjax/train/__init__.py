"""Training: train state, optimizer, jitted steps, checkpoints, metrics, loop."""

from memjax.train.checkpoint import Checkpointer
from memjax.train.loop import evaluate
from memjax.train.loop import train_and_evaluate
from memjax.train.metrics import MetricWriter
from memjax.train.optim import learning_rate_schedule
from memjax.train.optim import make_optimizer
from memjax.train.optim import weight_decay_mask
from memjax.train.state import TrainState
from memjax.train.state import create_train_state
from memjax.train.state import train_state_shardings
from memjax.train.steps import make_eval_step
from memjax.train.steps import make_train_step
from memjax.train.steps import summarize
from memjax.train.steps import token_metrics
