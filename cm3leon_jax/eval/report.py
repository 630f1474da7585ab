"""An evaluation's outputs: metrics.json, report.md (Markdown tables), samples.png, infill.png.

    write(out_dir, metrics, figures, stage_seconds=quickstart_seconds(workdir))

Every file is written to a temp name and renamed, so a report on disk is always complete.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from cm3leon_jax.eval import attributes, grids
from cm3leon_jax.train import time_budget

ATTRIBUTE_ROWS = ("all", "colour", "shape", "size", "position", "count")
SAMPLE_COLUMNS = 8
INFILL_EXAMPLES = 8  # triptychs in infill.png, two per row
# The name cm3leon_jax/quickstart.py gives the stage that runs `cm3leon eval --suite quickstart`.
QUICKSTART_EVAL_STAGE = "generate + evaluate"


def quickstart_seconds(workdir: str) -> dict[str, float]:
  """Per-stage wall times recorded by `cm3leon quickstart` ({} when there are none)."""
  try:
    with open(os.path.join(workdir, "quickstart.json")) as f:
      return {k: float(v) for k, v in json.load(f).get("done", {}).items()}
  except (FileNotFoundError, json.JSONDecodeError, AttributeError, TypeError, ValueError):
    return {}


def _pct(x) -> str:
  return "n/a" if x is None else f"{100.0 * x:.1f}%"


def _interval(accuracy: float, n: int) -> str:
  """The 95% Wilson interval of an accuracy over n prompts, e.g. "30.9-63.6%"."""
  lo, hi = attributes.wilson_interval(int(round(accuracy * n)), n)
  return f"{100.0 * lo:.1f}-{100.0 * hi:.1f}%"


def _num(x, digits: int = 2) -> str:
  return "n/a" if x is None else f"{x:.{digits}f}"


def _cell(text: str) -> str:
  return str(text).replace("|", "\\|").replace("\n", " ")


def table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
  out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
  return out + [""]


def _attribute_table(columns: dict[str, dict | None]) -> list[str]:
  """Rows = attributes, one column per named score dict (None or a missing key: blank)."""
  names = list(columns)
  rows = []
  for key in ATTRIBUTE_ROWS:
    if not any(c and key in c for c in columns.values()):
      continue
    rows.append([f"**{key}**" if key == "all" else key]
                + [_pct(c.get(key)) if c and key in c else "" for c in columns.values()])
  return table(["attribute", *names], rows)


def _text_to_image(m: dict) -> list[str]:
  out = ["## Text-to-image: held-out single-object prompts", "",
         f"{m['num_prompts']} prompts from the `heldout` split (colour-shape pairs never seen in "
         f"training), {m['num_candidates']} candidates each ({m['pool']} pool, CFG weight "
         f"{m['cfg_weight']:g}, {m['num_retrieved']} retrieved documents per prompt"
         + (f", {m['mean_retrieved']:.2f} on average after dropping those that did not fit "
            "the window" if m.get("mean_retrieved", m["num_retrieved"]) < m["num_retrieved"]
            else "") + "), "
         + ("the best re-ranked by the dual encoder. " if m["reranked"]
            else "no re-ranking (" + ("one candidate per prompt). " if m["num_candidates"] == 1
                                     else "no dual encoder). "))
         + "The analyzer parses each image back into objects and checks them against the "
         "prompt's scene; **all** = every attribute right and exactly one object. Chance = a "
         "uniformly random object (1/8 colours x 1/5 shapes x 1/2 sizes x 1/9 cells). "
         "Target (issue 9): all >= 80%. One prompt is "
         f"{100.0 / m['num_prompts']:.1f} points: the 95% (Wilson) interval of **all** is "
         f"{_interval(m['accuracy']['all'], m['num_prompts'])} (the prompts' sampling "
         "alone; decoders trained with other seeds add their own spread).", ""]
  columns = {"best of pool (re-ranked)": m["accuracy"],
             "a random candidate": m["accuracy_candidates"]}
  if "seen_pairs" in m:
    s = m["seen_pairs"]
    out += [f"The last two columns repeat this on {s['num_prompts']} single-object prompts of the "
            f"`{s['split']}` split: scenes not in training, but of colour-shape pairs that are, so "
            "the gap to the first two is what compositional generalisation costs.", ""]
    columns.update({"seen pairs: best of pool": s["accuracy"],
                    "seen pairs: a random candidate": s["accuracy_candidates"]})
  out += _attribute_table({**columns, "chance": m["chance"]})
  if "pool_oracle" in m:
    s = m.get("seen_pairs", {})
    out += ["Where the misses come from (**all**): *a right candidate in the pool* = prompts with "
            "at least one exactly right candidate, the most re-ranking can pick; *VQ "
            "reconstruction* = the prompts' real renders encoded and decoded by the VQ, the "
            "most any decoder can draw through it.", ""]
    out += table(["prompts", "re-ranked best", "a right candidate in the pool",
                  "VQ reconstruction"],
                 [[name, _pct(x["accuracy"]["all"]), _pct(x.get("pool_oracle")),
                   _pct(x["vq_reconstruction"]["all"]) if "vq_reconstruction" in x else ""]
                  for name, x in (("never-seen pairs", m), ("seen pairs", s)) if x])
  if "clip_score" in m:
    c = m["clip_score"]
    out += ["CLIP score (dual encoder, 100 x cosine):", ""]
    out += table(["images", "CLIP score"], [["best of pool", _num(c["best"])],
                                           ["all candidates", _num(c["candidates"])],
                                           ["real renders of the prompts", _num(c["real"])]])
  f = m["fid"]
  out += [f"Fréchet distance to {f['num_real']} real held-out single-object images, features: "
          f"`{f['features']}` (comparable within this project only, not with published FIDs). "
          "The floor is the distance of as many *real* images to the same set: what sampling "
          "noise alone gives at that size (n/a: the split has too few single-object "
          "images for a floor of that size).", ""]
  out += table(["generated set", "images", "FID", "real-vs-real floor"],
               [[name, f[key]["num_images"], _num(f[key]["fid"]), _num(f[key]["floor"])]
                for name, key in (("best of pool", "best"), ("all candidates", "candidates"))])
  return out


def _binding(m: dict) -> list[str]:
  ks = list(m["by_retrieved"])
  out = ["## Attribute binding: does the image likelihood follow the caption?", "",
         f"{m['num_scenes']} single-object scenes of the `{m['split']}` split. For each, the "
         "decoder's teacher-forced NLL of the scene's image codes under its own caption and "
         "under the captions made by swapping one attribute word (every other colour, shape "
         "or size). *Lowest* = how often the true caption gives the lowest NLL (a decoder that "
         "ignores the word: chance); *margin* = median of (lowest swapped NLL - true NLL), in "
         "nats per image. No sampling: this is what the decoder learnt, apart from how it is "
         "sampled and re-ranked.", ""]
  header = ["attribute"]
  for k in ks:
    header += [f"lowest ({k} retrieved)", f"margin ({k} retrieved)"]
  rows = []
  for name in m["by_retrieved"][ks[0]]:
    row = [name]
    for k in ks:
      a = m["by_retrieved"][k][name]
      row += [_pct(a["accuracy"]), _num(a["median_margin"])]
    rows.append(row + [_pct(m["by_retrieved"][ks[0]][name]["chance"])])
  return out + table(header + ["chance"], rows)


def _captioning(m: dict) -> list[str]:
  out = ["## Captioning: attribute recall on eval images", "",
         f"{m['num_images']} eval images captioned ("
         + (f"the instruction \"{m['instruction']}\" after the image" if m.get("instruction")
            else "causal prompt") + ", greedy). Each caption is "
         "parsed with the analyzer's prompt parser and matched to the true scene; recall = the "
         "fraction of the scene's objects whose attribute the caption states correctly; "
         "**all** = every attribute of every object and no extra object. The dataset's own "
         "captions check the parser (should be 100%).", ""]
  out += _attribute_table({"generated captions": m["recall"],
                           "dataset captions": m["reference_recall"], "chance": m["chance"]})
  out += [f"CIDEr-D against the dataset caption (one reference): {m['cider_d']:.1f}", ""]
  out += table(["generated caption", "dataset caption"],
               [[e["caption"] or "(empty)", e["reference"]] for e in m["examples"]])
  return out


def _infilling(m: dict) -> list[str]:
  r0, r1 = m["code_rows"]
  out = ["## Image infilling", "",
         f"{m['num_images']} eval images with an object in grid row {m['grid_row']}; code rows "
         f"{r0}..{r1 - 1} ({_pct(m['masked_fraction'])} of the image) are masked and regenerated "
         "through `<infill> <mask:0>` from the rest of the image and the caption"
         + (f" ({m['num_candidates']} infills per image, the best re-ranked by the dual encoder "
            "against the caption)" if m.get("num_candidates", 1) > 1 else "")
         + ". Analyzer "
         "accuracy against the true scene, beside two references: *band erased* = the original "
         "pixels with the band painted over in the background colour (what infilling must add "
         "to); *VQ reconstruction* = the whole image encoded and decoded, nothing masked (the "
         "most infilling can reach through the VQ).", ""]
  out += _attribute_table({"infilled": m["accuracy"], "band erased": m["erased"],
                           "VQ reconstruction": m["reconstruction"]})
  return out


def _vqa(m: dict) -> list[str]:
  out = ["## Visual question answering", "",
         f"{m['num_questions']} images of the `{m['split']}` split, one question each (colour, "
         "shape, count, position in turn), answered greedily after `<break> image <break> "
         "Question: ... Answer:` (the VQA template of data/tasks.py). VQAv2 accuracy with the "
         "one exact reference; *prior* = always the most frequent answer of the question's kind, "
         "without the image. A decoder that was never instruction-tuned on this template "
         "(`cm3leon train` alone) is not expected to beat the prior.", ""]
  rows = [[kind, _pct(m["by_kind"][kind]), _pct(m["prior_by_kind"][kind])] for kind in m["by_kind"]]
  rows.append(["**all**", _pct(m["accuracy"]), _pct(m["prior"])])
  out += table(["question kind", "decoder", "prior"], rows) + [""]
  out += table(["question", "answer", "decoder's answer"],
               [[e["question"], e["answer"], e["prediction"]] for e in m["examples"]]) + [""]
  return out


def _seconds(metrics: dict, stage_seconds: dict[str, float]) -> list[str]:
  # The quickstart's own record of this evaluation (from an earlier run) is replaced by the
  # evaluation's per-stage times, so the total counts it once.
  earlier = {k: v for k, v in stage_seconds.items() if k != QUICKSTART_EVAL_STAGE}
  rows = [[f"quickstart: {k}", f"{v:.1f}"] for k, v in earlier.items()]
  rows += [[f"eval: {k.replace('_', '-')}", f"{v:.1f}"] for k, v in metrics["seconds"].items()]
  total = sum(earlier.values()) + sum(metrics["seconds"].values())
  rows.append(["**total**", f"**{total:.1f}**"])
  return ["## Wall time per stage", ""] + table(["stage", "seconds"], rows)


def _time_budget(fitted: dict | None) -> list[str]:
  """A decoder trained fewer steps than its preset's, to fit a time budget, says so first:
  the scores above are of that shorter run."""
  if not time_budget.cut_short(fitted):
    return []
  layers = time_budget.depth_change(fitted)
  depth = f", with {layers[0]} of its preset's {layers[1]} layers" if layers else ""
  why = (f" (fewer than `train.time_budget_min_steps` of the {layers[1]}-layer decoder fit, "
         "so the trainer started again shallower)" if layers else "")
  return [f"**The decoder trained {int(fitted['steps']):,} of its preset's "
          f"{int(fitted['configured_steps']):,} steps{depth}**: {float(fitted['step_s']):.3f} s "
          f"per step on this machine, and its time budget ({float(fitted['budget_s']):.0f} s, "
          f"what `quickstart.budget_s` left after the stages before it) held no more{why}. "
          "To train the preset's decoder in full, delete the workdir's `decoder/` and re-run the "
          "quickstart with `--config.quickstart.budget_s=0`.", ""]


def markdown(metrics: dict, stage_seconds: dict[str, float] | None = None) -> str:
  out = [f"# CM3Leon evaluation: suite `{metrics['suite']}`, preset `{metrics['preset']}`", ""]
  headline = []
  if "text_to_image" in metrics:
    t = metrics["text_to_image"]
    seen = t.get("seen_pairs")
    headline.append(f"text-to-image all-attributes accuracy {_pct(t['accuracy']['all'])} "
                    f"on unseen colour-shape pairs"
                    + (f", {_pct(seen['accuracy']['all'])} on unseen scenes of seen pairs"
                       if seen else "")
                    + f" (chance {_pct(t['chance']['all'])}; 95% interval{'s' if seen else ''} "
                    + _interval(t["accuracy"]["all"], t["num_prompts"])
                    + (f" and {_interval(seen['accuracy']['all'], seen['num_prompts'])}"
                       if seen else "")
                    + f" over {t['num_prompts']} prompts"
                    + (f" and {seen['num_prompts']}" if seen else "") + ")")
  if "captioning" in metrics:
    headline.append(f"caption attribute recall (all) {_pct(metrics['captioning']['recall']['all'])}")
  if "infilling" in metrics:
    headline.append(f"infilling accuracy {_pct(metrics['infilling']['accuracy']['all'])}")
  if "vqa" in metrics:
    headline.append(f"VQA accuracy {_pct(metrics['vqa']['accuracy'])} "
                    f"(prior {_pct(metrics['vqa']['prior'])})")
  if headline:
    out += ["Headline: " + "; ".join(headline) + ".", ""]
  out += _time_budget(metrics.get("time_budget"))
  if "text_to_image" in metrics:
    out += _text_to_image(metrics["text_to_image"]) + ["![samples](samples.png)", ""]
  if "binding" in metrics:
    out += _binding(metrics["binding"])
  if "captioning" in metrics:
    out += _captioning(metrics["captioning"])
  if "infilling" in metrics:
    out += _infilling(metrics["infilling"]) + ["![infill](infill.png)", ""]
  if "vqa" in metrics:
    out += _vqa(metrics["vqa"])
  out += _seconds(metrics, stage_seconds or {})
  return "\n".join(out)


def _write_text(path: str, text: str) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def write(out_dir: str, metrics: dict, figures: dict,
          stage_seconds: dict[str, float] | None = None) -> list[str]:
  """metrics.json, report.md and the figures' PNGs into out_dir; returns the paths written."""
  os.makedirs(out_dir, exist_ok=True)
  written = []
  if "samples" in figures:
    images, prompts = figures["samples"]
    path = os.path.join(out_dir, "samples.png")
    grids.save_png(grids.captioned_grid(images, prompts, columns=SAMPLE_COLUMNS), path)
    written.append(path)
  if "infill" in figures:
    path = os.path.join(out_dir, "infill.png")
    grids.save_png(grids.infill_grid(*figures["infill"], count=INFILL_EXAMPLES), path)
    written.append(path)
  full = dict(metrics, quickstart_seconds=stage_seconds or {})
  path = os.path.join(out_dir, "metrics.json")
  _write_text(path, json.dumps(full, indent=1) + "\n")
  written.append(path)
  path = os.path.join(out_dir, "report.md")
  _write_text(path, markdown(metrics, stage_seconds))
  written.append(path)
  return written
