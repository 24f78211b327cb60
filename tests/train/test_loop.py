"""Tests of the training loop: it learns, writes its files, resumes exactly and
evaluates exactly."""

import glob
import importlib.util
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from memjax import data
from memjax import train
from memjax.models import DecoderLM
from memjax.train import loop
from memjax.train import steps
from tests.data.test_text import build_tiny_text

_CONFIG_DIR = os.path.join(
    os.path.dirname(__file__), "..", "..", "experiments", "configs"
)
_NUM_STEPS = 40
_HALF = _NUM_STEPS // 2


def _config(name, variant):
  """get_config(variant) of experiments/configs/<name>.py."""
  spec = importlib.util.spec_from_file_location(
      f"{name}_config", os.path.join(_CONFIG_DIR, f"{name}.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def _tiny_config(num_steps):
  """The MQAR `tiny` config on in-memory data, with a fixed schedule horizon."""
  config = _config("mqar", "tiny")
  config.data.source = "numpy"
  config.train.num_steps = num_steps
  # The learning rate of a step must not depend on where the run stops.
  config.train.decay_steps = _NUM_STEPS
  config.train.log_every = 5
  config.train.checkpoint_every = _HALF
  config.train.eval_every = _HALF
  return config


def _read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _train_losses(workdir, after=0):
  return {
      row["step"]: row["train/loss"]
      for row in _read_metrics(workdir)
      if "train/loss" in row and row["step"] > after
  }


def _restore(workdir, step):
  """The train state saved at `step` in the run's checkpoints."""
  config = _tiny_config(_NUM_STEPS)
  model = DecoderLM(**config.model)
  optimizer = train.make_optimizer(config.train)
  tokens = {"inputs": np.zeros((1, config.data.seq_len), np.int32)}
  template = train.create_train_state(model, optimizer, jax.random.key(0), tokens)
  checkpointer = train.Checkpointer(
      os.path.join(workdir, "checkpoints"), save_every=_HALF, keep=2
  )
  state = checkpointer.restore(template, step=step)
  checkpointer.close()
  return state


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  """An uninterrupted run of _NUM_STEPS steps: (workdir, final metrics)."""
  workdir = str(tmp_path_factory.mktemp("full"))
  return workdir, train.train_and_evaluate(_tiny_config(_NUM_STEPS), workdir)


def test_smoke_run_learns_and_writes_its_files(full_run):
  workdir, final = full_run
  losses = _train_losses(workdir)
  assert sorted(losses) == list(range(5, _NUM_STEPS + 1, 5))
  assert losses[_NUM_STEPS] < losses[5] - 0.5
  assert 0.0 <= final["eval/accuracy"] <= 1.0
  evals = [row for row in _read_metrics(workdir) if "eval/accuracy" in row]
  assert [row["step"] for row in evals] == [_HALF, _NUM_STEPS]
  assert evals[-1]["eval/accuracy"] == final["eval/accuracy"]
  assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [
      str(_HALF),
      str(_NUM_STEPS),
  ]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["train"]["num_steps"] == _NUM_STEPS


def test_resumed_run_matches_uninterrupted_run(full_run, tmp_path):
  if jax.default_backend() != "cpu" and (
      "--xla_gpu_deterministic_ops=true" not in os.environ.get("XLA_FLAGS", "")
  ):
    pytest.skip("bit-identical steps on a GPU need deterministic XLA ops")
  full_dir, full_final = full_run
  workdir = str(tmp_path)
  train.train_and_evaluate(_tiny_config(_HALF), workdir)
  resumed_final = train.train_and_evaluate(_tiny_config(_NUM_STEPS), workdir)

  # Step _HALF was saved in the background while the full run went on training
  # with donated buffers; it must still hold the state of that step.
  for step in (_HALF, _NUM_STEPS):
    expected = jax.tree.leaves(_restore(full_dir, step))
    actual = jax.tree.leaves(_restore(workdir, step))
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(e))
  assert _train_losses(workdir, after=_HALF) == _train_losses(
      full_dir, after=_HALF
  )
  assert resumed_final == full_final


class _ConstantPredictor(nn.Module):
  """Logits that always favour `token`, whatever the input."""

  vocab_size: int
  token: int

  @nn.compact
  def __call__(self, tokens):
    offset = self.param("offset", nn.initializers.zeros, (self.vocab_size,))
    logits = 3.0 * jax.nn.one_hot(self.token, self.vocab_size) + offset
    return jnp.broadcast_to(logits, tokens.shape + (self.vocab_size,))


def test_eval_aggregates_exactly_over_padded_batches():
  task = data.MqarTask(vocab_size=32, seq_len=24, num_kv_pairs=3)
  arrays = data.generate_mqar(task, 37, seed=3)  # 37 = 4 * 8 + 5: a short batch
  labels = arrays["labels"][arrays["labels"] != data.IGNORE_INDEX]
  token = int(np.bincount(labels).argmax())
  model = _ConstantPredictor(task.vocab_size, token)
  params = model.init(jax.random.key(0), arrays["inputs"][:1])["params"]

  metrics = train.evaluate(
      train.make_eval_step(model),
      params,
      batches=data.eval_batches(data.ArraySource(arrays), 8),
  )

  assert metrics["accuracy"] == np.sum(labels == token) / labels.size
  logits = 3.0 * np.eye(task.vocab_size)[token]
  log_probs = logits - np.log(np.sum(np.exp(logits)))
  np.testing.assert_allclose(metrics["loss"], -log_probs[labels].mean(), rtol=1e-6)
  # The values of an example are distinct, so one token answers none exactly.
  assert metrics["exact_match"] == 0.0


def test_exact_match_on_hand_made_logits():
  ignore = data.IGNORE_INDEX
  labels = np.array([
      [5, ignore, 3, ignore],  # every labelled position right
      [ignore, 2, 2, ignore],  # one of two wrong
      [ignore, ignore, ignore, ignore],  # padding: no example
      [ignore, ignore, ignore, 1],  # one label, right
      [4, 4, 4, 4],  # all wrong
  ])
  predicted = np.array([
      [5, 0, 3, 7],
      [1, 2, 6, 2],
      [0, 0, 0, 0],
      [3, 3, 3, 1],
      [0, 1, 2, 3],
  ])
  logits = jnp.asarray(np.eye(8)[predicted])
  counts = steps.example_metrics(logits, jnp.asarray(labels))
  assert int(counts["exact"]) == 2 and int(counts["examples"]) == 4
  sums = {**steps.token_metrics(logits, jnp.asarray(labels)), **counts}
  means = steps.summarize(steps.add_metrics({}, sums))
  assert means["exact_match"] == 0.5
  assert means["accuracy"] == 4 / 9
  # Only padding rows: no examples, so no exact-match rate; training sums have none.
  only_padding = steps.example_metrics(logits[2:3], jnp.asarray(labels[2:3]))
  assert int(only_padding["examples"]) == 0
  assert np.isnan(steps.summarize(steps.add_metrics({}, only_padding))["exact_match"])
  train_sums = steps.token_metrics(logits, jnp.asarray(labels))
  assert "exact_match" not in steps.summarize(train_sums)


def _smoke_run(config, workdir):
  """Runs a `tiny` config; checks its metrics and returns the final ones."""
  # The wiring of the task is under test, not the kernels; the reference
  # implementation compiles fastest on a CPU.
  config.model.implementation = "reference"
  final = train.train_and_evaluate(config, str(workdir))
  evals = [row for row in _read_metrics(workdir) if "eval/exact_match" in row]
  assert [row["step"] for row in evals] == [config.train.num_steps]
  assert evals[-1]["eval/exact_match"] == final["eval/exact_match"]
  for name in ("eval/accuracy", "eval/exact_match"):
    assert 0.0 <= final[name] <= 1.0
  assert np.isfinite(final["eval/loss"]) and np.isfinite(final["train/loss"])
  return final


def test_sniah_tiny_config_runs(tmp_path):
  _smoke_run(_config("sniah", "tiny"), tmp_path)
  assert os.listdir(tmp_path / "tfds" / "sniah")


def test_sniah_tiny_config_runs_with_sliding_window_attention(tmp_path):
  # The S-NIAH baseline of the Titans table: "swa" layers need config.model.attention_window.
  config = _config("sniah", "tiny")
  config.model.mixers = "swa"
  config.model.attention_window = 16
  config.data.source = "numpy"
  _smoke_run(config, tmp_path)


def test_lm_tiny_config_runs_on_a_local_dataset(tmp_path):
  config = _config("lm", "tiny")
  config.data.dataset = build_tiny_text(tmp_path / "tfds")
  config.data.data_dir = str(tmp_path / "tfds")
  config.data.eval_split = "test"
  _smoke_run(config, tmp_path / "run")


@pytest.mark.parametrize(
    "name, change, match",
    [
        ("sniah", dict(task="qa"), "data.task"),
        ("sniah", dict(needle="uuid"), "needle"),
        ("lm", dict(feature="body"), "feature"),
    ],
)
def test_bad_data_configs_raise(tmp_path, name, change, match):
  config = _config(name, "tiny")
  if name == "lm":
    config.data.dataset = build_tiny_text(tmp_path / "tfds")
    config.data.data_dir = str(tmp_path / "tfds")
  config.data.update(change)
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_model_must_embed_the_byte_tokens(tmp_path):
  config = _config("sniah", "tiny")
  config.model.vocab_size = 256
  with pytest.raises(ValueError, match="model.vocab_size=256"):
    train.train_and_evaluate(config, str(tmp_path))


def test_weight_decay_skips_biases_scales_and_vectors():
  params = {
      "dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
      "norm": {"scale": jnp.ones(3)},
      "gate": {"vector": jnp.ones(3)},
      "embed": {"embedding": jnp.ones((4, 3))},
  }
  assert train.weight_decay_mask(params) == {
      "dense": {"kernel": True, "bias": False},
      "norm": {"scale": False},
      "gate": {"vector": False},
      "embed": {"embedding": True},
  }


def test_weight_decay_does_not_count_the_layer_axis_of_scanned_runs():
  params = {
      "layers_0_3": {"mixer": {"A_log": jnp.ones((4, 2)),
                               "q_proj": {"kernel": jnp.ones((4, 3, 2))}},
                     "norm": {"scale": jnp.ones((4, 3))}},
      "layer_4": {"mixer": {"A_log": jnp.ones(2)}},
  }
  assert train.weight_decay_mask(params) == {
      "layers_0_3": {"mixer": {"A_log": False, "q_proj": {"kernel": True}},
                     "norm": {"scale": False}},
      "layer_4": {"mixer": {"A_log": False}},
  }


def test_schedule_warms_up_then_decays_to_zero():
  config = _tiny_config(_NUM_STEPS).train
  schedule = train.learning_rate_schedule(config)
  peak = config.learning_rate
  assert schedule(0) == 0.0
  np.testing.assert_allclose(schedule(config.warmup_steps), peak, rtol=1e-6)
  assert 0.0 < schedule(_HALF) < peak
  np.testing.assert_allclose(schedule(_NUM_STEPS), 0.0, atol=1e-9)
  assert isinstance(train.make_optimizer(config), optax.GradientTransformation)


def test_progress_bar_fills_in_proportion():
  assert loop.progress_bar(0, 40) == "[" + "-" * 20 + "]"
  assert loop.progress_bar(10, 40) == "[" + "#" * 5 + "-" * 15 + "]"
  assert loop.progress_bar(40, 40, width=4) == "[####]"
