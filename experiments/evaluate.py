r"""Scores a trained run at other context lengths: the Titans S-NIAH protocol.

The model trains on short contexts (experiments/train.py); this binary
restores the newest checkpoint of its --workdir and scores the held-out split
of the task at each of --seq_lens: the S-NIAH context length, the MQAR
sequence length. From the repo root, after the S-NIAH run of
experiments/configs/sniah.py (trained at 1024 tokens):

  python experiments/evaluate.py --config=experiments/configs/sniah.py \
      --workdir=/tmp/memjax/sniah --seq_lens=1024,2048,4096,8192 \
      --needles=passkey,number,word --batch_size=4

It prints one row per length and needle (loss, accuracy, exact_match: the
RULER score) and writes them to `<workdir>/eval_lengths.csv` (or --output),
with columns named as experiments/sweep.py names them, so that

  python experiments/plot.py --csv=/tmp/memjax/sniah/eval_lengths.csv \
      --x=data.seq_len --series=data.needle --panel= --metric=eval/exact_match

draws exact match against the context length.

The model (architecture and parameters) is the run's: `model` of
`<workdir>/config.json`, whatever --config says. --config gives the task
(its `data` section, e.g. `--config.data.depth=0.5`) and the default batch
size (`train.batch_size`); without it, the run's own `data` and `train`
sections are used. --needles (S-NIAH only) defaults to the config's needle.
Long contexts may need a smaller --batch_size. Only the test split is
generated at each length, into `data.data_dir` (default `<workdir>/tfds`).

Recurrent mixers ("gdn", "lmm", ...) and sliding-window attention ("swa")
run at any length; full attention ("attn") does too, with memory quadratic in
the length.
"""

import csv
import json
import os
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from memjax.train import evaluation

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file of the task, optionally with `:variant`; None: the run's config.json.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "The training run's workdir.", required=True
)
_SEQ_LENS = flags.DEFINE_list(
    "seq_lens", ["1024", "2048", "4096", "8192"], "Lengths to score, comma-separated."
)
_NEEDLES = flags.DEFINE_list(
    "needles", None, "S-NIAH needles to score (passkey,number,word); None: the config's."
)
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Examples per eval batch; None: the config's train.batch_size."
)
_OUTPUT = flags.DEFINE_string(
    "output", None, "The CSV written; None means <workdir>/eval_lengths.csv."
)

OUTPUT_FILE = "eval_lengths.csv"


def parse_seq_lens(texts: Sequence[str]) -> list[int]:
  """The --seq_lens values as ints; ValueError naming the flag if one is not."""
  try:
    return [int(text) for text in texts]
  except ValueError:
    raise ValueError(f"--seq_lens takes integers, got {list(texts)}.") from None


def model_differences(config: Any, run_config: Any) -> list[str]:
  """The fields of --config's `model` section that differ from the run's."""
  # Through JSON, as the run's config.json was written: shared field
  # references become values and tuples lists.
  mine = json.loads(config.model.to_json_best_effort())
  theirs = run_config.model.to_dict()
  return sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  """The rows as an aligned text table, floats to four decimals."""
  columns = list(rows[0])
  cells = [
      [f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
      for row in rows
  ]
  widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
  lines = [columns, *cells]
  return "\n".join(
      "  ".join(text.rjust(width) for text, width in zip(line, widths))
      for line in lines
  )


def write_csv(rows: Sequence[dict[str, Any]], path: str) -> None:
  """Writes the rows, header first, replacing the file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # As in train.py: orbax logs at INFO, which would bury the rows.
    logging.set_verbosity(logging.WARNING)
  seq_lens = parse_seq_lens(_SEQ_LENS.value)
  run = evaluation.restore_run(_WORKDIR.value)
  config = _CONFIG.value or run.config
  differ = model_differences(config, run.config)
  if differ:
    print(
        f"note: --config's model differs from the run's in {differ}; the "
        "run's model is evaluated.",
        flush=True,
    )
  print(f"evaluating step {run.step} of {run.workdir}", flush=True)
  batch_size = _BATCH_SIZE.value
  if batch_size is None:
    batch_size = config.train.batch_size
  rows = evaluation.evaluate_lengths(
      run, config.data, seq_lens, needles=_NEEDLES.value, batch_size=batch_size
  )
  print(format_table(rows), flush=True)
  path = _OUTPUT.value or os.path.join(run.workdir, OUTPUT_FILE)
  write_csv(rows, path)
  print(f"wrote {path}", flush=True)


if __name__ == "__main__":
  app.run(main)
