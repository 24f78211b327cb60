r"""Draws the standard figures of a sweep CSV written by experiments/sweep.py.

One line per `--series` value (the mixers by default), `--metric` against the
numeric column `--x` (log2 axis), one panel per combination of the `--panel`
columns. The defaults draw Zoology's MQAR figure, accuracy against the model
width per (seq_len, num_kv_pairs) setting; with `--x=data.seq_len --panel=`
it draws S-NIAH accuracy against the context length. From the repo root, after
the sweeps of experiments/sweep.py's docstring:

  python experiments/plot.py --csv=/tmp/memjax/zoology/results.csv
  python experiments/plot.py --csv=/tmp/memjax/sniah_sweep/results.csv \
      --x=data.seq_len --panel= --metric=eval/exact_match \
      --out=/tmp/memjax/sniah_sweep/exact_match.png

`--out` is a .png path or a directory; by default the figure goes next to the
CSV as `<metric>_vs_<x>.png` (e.g. `accuracy_vs_d_model.png`). Rows that differ
in a column not among x, series and panel would share a point, which is an
error: add that column to --panel.
"""

import csv
import os
from typing import Sequence

from absl import app
from absl import flags

_CSV = flags.DEFINE_string("csv", None, "The sweep's results.csv.", required=True)
_OUT = flags.DEFINE_string(
    "out", None, "A .png path or a directory; None means the CSV's directory."
)
_X = flags.DEFINE_string("x", "model.d_model", "Numeric column of the x axis.")
_SERIES = flags.DEFINE_string("series", "model.mixers", "Column with one line per value.")
_PANEL = flags.DEFINE_list(
    "panel",
    ["data.seq_len", "data.num_kv_pairs"],
    "Columns with one panel per combination of values; empty for one panel.",
)
_METRIC = flags.DEFINE_string("metric", "eval/accuracy", "Column of the y axis.")

# {panel values: {series value: [(x, y)] sorted by x}}.
Groups = dict[tuple[str, ...], dict[str, list[tuple[float, float]]]]


def read_rows(csv_path: str) -> list[dict[str, str]]:
  """The rows of a sweep CSV, as {column: text}."""
  with open(csv_path, newline="") as f:
    return list(csv.DictReader(f))


def group_rows(
    rows: Sequence[dict[str, str]],
    x: str,
    series: str,
    panel: Sequence[str],
    metric: str,
) -> Groups:
  """Groups rows into panels and lines, keeping the order of first appearance.

  Args:
    rows: {column: text} per run, as from `read_rows`.
    x: The numeric column of the x axis, e.g. "model.d_model".
    series: The column with one line per value, e.g. "model.mixers".
    panel: The columns with one panel per combination of values, e.g.
      ("data.seq_len", "data.num_kv_pairs"); empty for one panel.
    metric: The column of the y axis, e.g. "eval/accuracy".

  Returns:
    {panel values: {series value: [(x, y)] sorted by x}}; with no panel
    columns the only key is ().

  Raises:
    ValueError: for no rows, a column not in the rows (named by its argument),
      a non-numeric x or metric, or two rows at the same panel, series and x.
  """
  if not rows:
    raise ValueError("rows is empty: the CSV has no runs yet.")
  columns = list(rows[0])
  for argument, names in (("x", [x]), ("series", [series]), ("panel", panel),
                          ("metric", [metric])):
    missing = [name for name in names if name not in columns]
    if missing:
      raise ValueError(f"{argument} names {missing}, not columns of the CSV: {columns}.")
  groups: Groups = {}
  for row in rows:
    line = groups.setdefault(tuple(row[p] for p in panel), {}).setdefault(row[series], [])
    point = (_number(row, x, "x"), _number(row, metric, "metric"))
    if any(point[0] == seen for seen, _ in line):
      raise ValueError(
          f"two rows have {x}={row[x]}, {series}={row[series]} and panel "
          f"{dict(zip(panel, (row[p] for p in panel)))}: add the column they "
          "differ in to panel."
      )
    line.append(point)
  for lines in groups.values():
    for line in lines.values():
      line.sort()
  return groups


def _number(row: dict[str, str], column: str, argument: str) -> float:
  """The row's value of a numeric column; ValueError naming the argument."""
  try:
    return float(row[column])
  except ValueError:
    raise ValueError(
        f"{argument} column {column} must be numeric, got {row[column]!r}."
    ) from None


def panel_title(panel: Sequence[str], values: tuple[str, ...]) -> str:
  """"seq_len=256, num_kv_pairs=16" for a panel's columns and values."""
  return ", ".join(
      f"{column.rsplit('.', 1)[-1]}={value}" for column, value in zip(panel, values)
  )


def output_path(out: str | None, csv_path: str, x: str, metric: str) -> str:
  """The figure's path: `out` if a .png, else `<metric>_vs_<x>.png` in a directory.

  Args:
    out: A .png path, a directory, or None for the CSV's directory.
    csv_path: The sweep CSV.
    x: The x column, e.g. "model.d_model".
    metric: The y column, e.g. "eval/accuracy".

  Returns:
    The path, e.g. "<dir>/accuracy_vs_d_model.png".
  """
  if out and out.endswith(".png"):
    return out
  directory = out or os.path.dirname(os.path.abspath(csv_path))
  leaf = lambda column: column.rsplit("/", 1)[-1].rsplit(".", 1)[-1]
  return os.path.join(directory, f"{leaf(metric)}_vs_{leaf(x)}.png")


def draw(
    groups: Groups,
    path: str,
    *,
    x: str,
    panel: Sequence[str],
    metric: str,
) -> None:
  """Draws one panel per group, one line per series, into a png.

  Args:
    groups: As from `group_rows`.
    path: The png to write; its directory is created.
    x: The x column, for the axis label.
    panel: The panel columns, for the titles.
    metric: The y column, for the axis label.
  """
  try:
    import matplotlib  # Imported here: grouping rows does not need it.
  except ImportError:
    raise ImportError(
        "experiments/plot.py draws with matplotlib, which is not installed: "
        "pip install 'matplotlib>=3.8' (or the package's `notebooks` extra)."
    ) from None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  # A series keeps its colour in every panel, and one legend lists all of them,
  # though a panel may lack some.
  names = list(dict.fromkeys(name for lines in groups.values() for name in lines))
  colors = {name: f"C{i % 10}" for i, name in enumerate(names)}
  fig, axes = plt.subplots(
      1, len(groups), figsize=(4 * len(groups) + 1.5, 3.5), sharey=True,
      squeeze=False, layout="constrained",
  )
  handles = {}
  for ax, (values, lines) in zip(axes[0], groups.items()):
    for name, points in lines.items():
      xs, ys = zip(*points)
      (handles[name],) = ax.plot(xs, ys, "o-", color=colors[name])
    # Widths and context lengths double from one run to the next.
    ticks = sorted({px for points in lines.values() for px, _ in points})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set(xlabel=x, title=panel_title(panel, values))
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel(metric)
  fig.legend([handles[name] for name in names], names, loc="outside right upper")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  groups = group_rows(
      read_rows(_CSV.value), _X.value, _SERIES.value, _PANEL.value, _METRIC.value
  )
  path = output_path(_OUT.value, _CSV.value, _X.value, _METRIC.value)
  draw(groups, path, x=_X.value, panel=_PANEL.value, metric=_METRIC.value)
  print(f"wrote {path}", flush=True)


if __name__ == "__main__":
  app.run(main)
