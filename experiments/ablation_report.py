"""The ablation report: spread over seeds, verdicts against the paper's claims, Markdown, plots.

    s = spread([0.25, 0.5])              # Spread(mean=0.375, std=0.177, n=2): sample std (ddof 1)
    verdict(better, worse)               # one plain sentence: does the pair agree with the claim?
    markdown(plan_info, rows, verdicts)  # report.md text
    plot_cfg(path, ...); plot_pools(path, ...)

Pure functions over the numbers experiments/ablations.py measured; nothing here runs a model.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Sequence

from cm3leon_jax.errors import InputError

# The metrics every text-to-image / infilling cell stores (experiments/ablations.py).
PRIMARY = "all"          # analyzer: every attribute right and exactly one object
SECONDARY = "attributes"  # mean of the colour, shape, size and position accuracies


class Spread(NamedTuple):
  mean: float
  std: float | None  # sample standard deviation (ddof = 1); None with a single value
  n: int


def spread(values: Sequence[float]) -> Spread:
  """Mean, sample standard deviation and count of per-seed values."""
  values = [float(v) for v in values if v is not None]
  if not values:
    raise InputError("spread: no values (every seed of this row is missing)")
  n = len(values)
  mean = sum(values) / n
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
  return Spread(mean, std, n)


def fmt(s: Spread | None, percent: bool = True) -> str:
  """'37.5% ± 17.7 (n=2)'; a single value has no spread: '37.5% (n=1)'."""
  if s is None:
    return "n/a"
  scale, unit, digits = (100.0, "%", 1) if percent else (1.0, "", 2)
  text = f"{scale * s.mean:.{digits}f}{unit}"
  if s.std is not None:
    text += f" ± {scale * s.std:.{digits}f}"
  return text + f" (n={s.n})"


def _standard_error(a: Spread, b: Spread) -> float | None:
  if a.std is None or b.std is None:
    return None
  return math.sqrt(a.std ** 2 / a.n + b.std ** 2 / b.n)


def verdict(better: dict[str, Spread], worse: dict[str, Spread]) -> str:
  """Judge the claim "`better` scores above `worse`" from per-metric spreads.

  Decided on the primary metric (all-attributes accuracy); when both sides tie there (e.g.
  both 0%), on the mean attribute accuracy, and the sentence says so. A difference within
  two standard errors of the seed spread is called "within the spread".
  """
  metric = PRIMARY
  if better[PRIMARY].mean == worse[PRIMARY].mean and SECONDARY in better and SECONDARY in worse:
    metric = SECONDARY
  a, b = better[metric], worse[metric]
  name = "all-attributes accuracy" if metric == PRIMARY else (
      "mean attribute accuracy (all-attributes accuracy tied at "
      f"{100 * better[PRIMARY].mean:.1f}%)")
  diff = 100.0 * (a.mean - b.mean)
  se = _standard_error(a, b)
  noise = "" if se is None else f", 2 standard errors = {200.0 * se:.1f} points"
  if diff < 0:
    strength = " beyond" if se is not None and -diff > 200.0 * se else " within"
    strength = strength + " the seed spread" if se is not None else " (one seed: no spread)"
    return (f"**against the paper's claim**: {name} {diff:+.1f} points{strength}"
            f"{noise}")
  if diff == 0:
    return f"**against the paper's claim** (not reproduced): no difference in {name}"
  if se is None:
    return f"in the claimed direction: {name} {diff:+.1f} points (one seed: no spread to judge)"
  if diff <= 200.0 * se:
    return (f"in the claimed direction but within the seed spread (not significant): {name} "
            f"{diff:+.1f} points{noise}")
  return f"agrees with the claim: {name} {diff:+.1f} points{noise}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return out + ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"
                for row in rows] + [""]


# --- plots -----------------------------------------------------------------------------------

def _pyplot():
  import matplotlib
  matplotlib.use("Agg")  # files only: no display on a server
  import matplotlib.pyplot as plt
  return plt


def _errorbar(ax, xs, spreads: Sequence[Spread], label: str, marker: str = "o"):
  ys = [100.0 * s.mean for s in spreads]
  errs = [100.0 * (s.std or 0.0) for s in spreads]
  ax.errorbar(xs, ys, yerr=errs, label=label, marker=marker, capsize=3)


def _finish(plt, fig, ax, path: str, xlabel: str, ylabel: str, title: str) -> None:
  """Labels, a zero floor, legend and grid, then the PNG; the figure is closed."""
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.set_ylim(bottom=0)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_cfg(path: str, weights: Sequence[float], series: dict[str, Sequence[Spread]],
             chance: float | None = None) -> None:
  """Accuracy (mean ± std over sampling seeds) against the CFG weight, one line per metric."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for label, spreads in series.items():
    _errorbar(ax, weights, spreads, label)
  if chance is not None:
    ax.axhline(100.0 * chance, color="grey", ls=":", label="chance (all attributes)")
  _finish(plt, fig, ax, path, "CFG weight (1 = no guidance)", "accuracy (%)",
          "Text-to-image accuracy vs CFG weight")


def plot_pools(path: str, sizes: Sequence[int], series: dict[str, Sequence[Spread]],
               ylabel: str) -> None:
  """Accuracy (mean ± std over sampling seeds) against the re-ranked pool size, per method."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for (label, spreads), marker in zip(series.items(), "osD^v<>"):
    _errorbar(ax, sizes, spreads, label, marker)
  ax.set_xscale("log", base=2)
  ax.set_xticks(list(sizes), [str(s) for s in sizes])
  _finish(plt, fig, ax, path, "candidates per prompt (best re-ranked by the dual encoder)",
          ylabel, "Text-to-image accuracy vs pool size")


# --- the report ------------------------------------------------------------------------------

# Row labels shared with experiments/ablations.py (the claims below look rows up by them).
RA, NO_RA = "retrieval-augmented training", "no retrieval in training"
CM3, CAUSAL = "CM3 masking (the recipe)", "plain causal (no CM3 masking)"
METRICS = ("all", "attributes", "clip", "fid", "mean_retrieved", "erased", "reconstruction")


def docs_label(k: int) -> str:
  return f"{k} retrieved"


def cfg_label(w: float) -> str:
  return f"weight {w:g}"


def group(results) -> dict[tuple[str, str, str], dict[str, Spread]]:
  """(cell, result) pairs -> per (item, row, column) the spread of each metric over seeds."""
  values: dict = {}
  for cell, result in results:
    values.setdefault((cell.item, cell.row, cell.column), []).append(result)
  out = {}
  for key, rs in values.items():
    out[key] = {m: spread([r[m] for r in rs]) for m in METRICS
                if any(r.get(m) is not None for r in rs)}
  return out


def claims(groups, info) -> list[tuple[str, str, str]]:
  """(item, the paper's claim, verdict from the numbers) for every comparison present."""
  out = []

  def add(item, claim, better, worse):
    if better in groups and worse in groups:
      out.append((item, claim, verdict(groups[better], groups[worse])))

  add("retrieval", "retrieval-augmented training beats training without retrieval (RA-CM3, "
      "CM3Leon)", ("retrieval", RA, ""), ("retrieval", NO_RA, ""))
  docs = sorted(info["docs"])
  for lo, hi in zip(docs, docs[1:]):
    add("docs", f"retrieving {hi} documents at inference beats retrieving {lo} (paper, 7B: FID "
        "10.82 / 5.78 / 4.88 with 0 / 1 / 2)", ("docs", docs_label(hi), ""), ("docs", docs_label(lo), ""))
  if info["cfg_weight"] != 1.0:
    add("cfg", f"guidance helps: the recipe's weight {info['cfg_weight']:g} beats weight 1 (no "
        "guidance)", ("cfg", cfg_label(info["cfg_weight"]), ""), ("cfg", cfg_label(1.0), ""))
  sizes = sorted(info["pool_sizes"])
  if len(sizes) > 1:
    for m in info["methods"]:
      add("pool", f"{m}: a re-ranked pool of {sizes[-1]} beats a single sample",
          ("pool", m, str(sizes[-1])), ("pool", m, str(sizes[0])))
    add("pool", f"mixed pools keep improving as the pool grows ({sizes[-2]} -> {sizes[-1]})",
        ("pool", "mixed", str(sizes[-1])), ("pool", "mixed", str(sizes[-2])))
  for m in ("top_p", "cdk", "temperature"):
    add("pool", f"half top-p + half CD-K beats {m} alone at a pool of {sizes[-1]}",
        ("pool", "mixed", str(sizes[-1])), ("pool", m, str(sizes[-1])))
  add("cm3", "CM3 masking makes image infilling possible; plain causal training does not",
      ("cm3", CM3, "infill"), ("cm3", CAUSAL, "infill"))
  return out


def _row(s: dict[str, Spread], *metrics: str) -> list[str]:
  cells = []
  for m in metrics:
    percent = m in ("all", "attributes", "erased", "reconstruction")
    cells.append(fmt(s.get(m), percent=percent) if m in s else "n/a")
  return cells


def _rows(groups, item: str, column: str = "") -> list[tuple[str, dict[str, Spread]]]:
  return [(row, s) for (it, row, col), s in groups.items() if it == item and col == column]


T2I_HEADER = ["all-attributes accuracy", "mean attribute accuracy", "CLIP score"]
T2I_METRICS = ("all", "attributes", "clip")


def markdown(groups, info, verdicts, plots: dict[str, str]) -> str:
  lines = [f"# CM3Leon ablations on Shapes (preset `{info['preset']}`)", "",
           f"Command: `{info['command']}`", "", f"Machine: {info['machine']}.", ""]
  lines += [
      f"Wall time of this invocation {info['seconds_this_run'] / 60:.1f} min (cells already "
      f"in `cells.json` were not re-measured); {info['trainings']} decoder trainings took "
      f"{info['seconds_training'] / 60:.1f} min in all, measuring the cells "
      f"{info['seconds_cells'] / 60:.1f} min, the upstream stages "
      + (f"came from `{info['from_workdir']}`." if info["from_workdir"] else
         f"{info['seconds_upstream'] / 60:.1f} min."), "",
      "Metric: the analyzer's accuracy on held-out single-object prompts (colour-shape pairs "
      f"never seen in training), {info['num_prompts']} prompts per cell, through "
      "`cm3leon_jax/eval/suite.py`: **all-attributes** = colour, shape, size and cell all "
      "right and exactly one object; *mean attribute accuracy* = the mean of the colour, "
      "shape, size and position accuracies; CLIP score = the dual encoder's 100 x cosine of "
      "the chosen image and its prompt. Unless a row says otherwise: "
      f"{info['num_candidates']} candidates ({info['pool']} pool) re-ranked by the dual "
      f"encoder, CFG weight {info['cfg_weight']:g}, {info['num_retrieved']} retrieved "
      f"documents, {info['train_steps']} training steps per decoder.", "",
      f"Spread: mean ± sample standard deviation over n seeds. Rows 1 and 5 train one decoder "
      f"per seed (`train.seed` and `data.shuffle_seed` = {info['train_seed']} + i); rows 2-4 "
      f"vary the sampling seed (`eval.seed` = {info['eval_seed']} + i) on the recipe's decoder "
      "of the first training seed.", ""]
  if info.get("chance") is not None:
    lines += [f"Random-chance all-attributes accuracy (a uniform guess of every attribute): "
              f"{100 * info['chance']:.2f}%.", ""]
  lines += ["## Against the paper's claims", ""]
  lines += [f"- ({ITEM_NUMBER[item]}) {claim}: {v}." for item, claim, v in verdicts]
  lines += [""]

  for item, title in info["items"].items():
    lines += [f"## {title}", ""]
    if item in ("retrieval", "docs", "cfg"):
      header = ["setting", *T2I_HEADER]
      if item in ("retrieval", "docs"):
        header.append("retrieved documents per prompt")
      rows = [[row, *_row(s, *T2I_METRICS)] + ([_row(s, "mean_retrieved")[0].split(" (")[0]]
                                               if len(header) == 5 else [])
              for row, s in _rows(groups, item)]
      lines += table(header, rows)
      if item == "cfg" and "cfg" in plots:
        lines += [f"![CFG sweep]({plots['cfg']})", ""]
    elif item == "pool":
      sizes = [str(n) for n in info["pool_sizes"]]
      for metric, name in (("all", "all-attributes accuracy"),
                           ("attributes", "mean attribute accuracy")):
        rows = []
        for m in info["methods"]:
          rows.append([m] + [_row(groups[("pool", m, n)], metric)[0]
                             if ("pool", m, n) in groups else "n/a" for n in sizes])
        lines += [f"{name.capitalize()} by pool size:", ""]
        lines += table(["method", *(f"pool of {n}" for n in sizes)], rows)
      lines += ["`temperature` = a top-p pool with top_p = 1 (plain temperature sampling with "
                "CFG); `mixed` = the first half of the pool top-p, the rest CD-K (a pool of 1 "
                "is top-p).", ""]
      if "pool" in plots:
        lines += [f"![pool size]({plots['pool']}) ![pool size, mean attribute]"
                  f"({plots['pool_attributes']})", ""]
    else:
      rows = []
      for label in (CM3, CAUSAL):
        infill, t2i = groups.get(("cm3", label, "infill"), {}), groups.get(("cm3", label, "t2i"), {})
        rows.append([label, *_row(infill, "all", "attributes"), *_row(t2i, "all", "attributes")])
      lines += table(["training", "infilling: all attributes", "infilling: mean attribute",
                      "text-to-image: all attributes", "text-to-image: mean attribute"], rows)
      ref = groups.get(("cm3", CM3, "infill"), {})
      if "erased" in ref:
        lines += ["Infilling bounds on the same images (suite.py): band erased "
                  f"{fmt(ref['erased'])}, VQ reconstruction {fmt(ref['reconstruction'])}.", ""]
  return "\n".join(lines)


ITEM_NUMBER = {"retrieval": 1, "docs": 2, "cfg": 3, "pool": 4, "cm3": 5}


def write(out_dir: str, results, info) -> list[str]:
  """report.md (+ cfg_sweep.png, pool_size*.png when those rows exist); each file written to a
  temp name and renamed."""
  groups = group(results)
  chance = next((r.get("chance") for c, r in results if c.task == "t2i"), None)
  info = {**info, "chance": chance}
  plots = {}
  weights = [w for w in info["cfg_weights"] if ("cfg", cfg_label(w), "") in groups]
  if weights:
    series = {name: [groups[("cfg", cfg_label(w), "")][m] for w in weights]
              for m, name in (("all", "all attributes"), ("attributes", "mean attribute"))}
    _save_plot(out_dir, "cfg_sweep.png", plot_cfg, weights, series, chance)
    plots["cfg"] = "cfg_sweep.png"
  if any(k[0] == "pool" for k in groups):
    fig_series = {m: [groups[("pool", m, str(n))]["all"] for n in info["pool_sizes"]]
                  for m in info["methods"]}
    fig_attr = {m: [groups[("pool", m, str(n))]["attributes"] for n in info["pool_sizes"]]
                for m in info["methods"]}
    _save_plot(out_dir, "pool_size.png", plot_pools, info["pool_sizes"], fig_series,
               "all-attributes accuracy (%)")
    _save_plot(out_dir, "pool_size_attributes.png", plot_pools, info["pool_sizes"], fig_attr,
               "mean attribute accuracy (%)")
    plots["pool"], plots["pool_attributes"] = "pool_size.png", "pool_size_attributes.png"
  text = markdown(groups, info, claims(groups, info), plots)
  path = os.path.join(out_dir, "report.md")
  with open(path + ".tmp", "w") as f:
    f.write(text + "\n")
  os.replace(path + ".tmp", path)
  return [path] + [os.path.join(out_dir, p) for p in plots.values()]


def _save_plot(out_dir, name, fn, *args):
  path = os.path.join(out_dir, name)
  fn(path + ".tmp.png", *args)
  os.replace(path + ".tmp.png", path)
