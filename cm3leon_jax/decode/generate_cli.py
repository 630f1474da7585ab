"""`cm3leon generate`: text-to-image, captioning and image infilling from the command line.

    cm3leon generate --prompt "a large red circle at the top left" --prompt "a blue square"
    cm3leon generate --task caption --prompt photo.png
    cm3leon generate --task infill --prompts-file prompts.jsonl --rows 2:6

Prompts come from `--prompt` (repeatable) or `--prompts-file`: one per line, or JSONL (a
`.jsonl` file) with one object per line. What a prompt is depends on the task:

    text-to-image   a caption                   JSONL: {"text": "a red circle"}
    caption         an image file               JSONL: {"image": "a.png"}
    infill          an image file, optionally   JSONL: {"image": "a.png", "text": "a red circle",
                    a TAB and its caption               "rows": [2, 6]}

Infilling regenerates the band of code rows [start, end) (`--rows`, default the middle third)
from the rest of the image and the caption. Relative image paths in a prompts file are relative
to the file. Writes into `--output` (default `<workdir>/samples`): `grid.png` (each output with
its prompt above it), one PNG per generated image, and `outputs.jsonl` (one record per prompt).
Bad prompts fail with one `error:` line before the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Sequence

import numpy as np

from cm3leon_jax.errors import InputError
from cm3leon_jax.paths import artifacts

TASKS = ("text-to-image", "caption", "infill")


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--task", default="text-to-image", choices=TASKS)
  p.add_argument("--prompt", action="append", default=[],
                 help="a prompt (repeatable): a caption, or an image path for caption/infill")
  p.add_argument("--prompts-file", default=None,
                 help="prompts, one per line, or a .jsonl file of objects (see the module doc)")
  p.add_argument("--output", default=None, help="output folder (default: <workdir>/samples)")
  p.add_argument("--rows", default=None, metavar="START:END",
                 help="infill: code rows to regenerate (default: the middle third)")
  p.add_argument("--num-candidates", type=int, default=None,
                 help="candidates per prompt, the best re-ranked by the dual encoder (text-to-image "
                      "and captioned infills; default: decoding.num_candidates)")
  p.add_argument("--num-retrieved", type=int, default=None,
                 help="documents retrieved per prompt (default: decoding.num_retrieved; 0 = off)")
  p.add_argument("--seed", type=int, default=None, help="default: decoding.seed")
  p.add_argument("--step", type=int, default=None, help="decoder checkpoint step (default: latest)")
  p.add_argument("--decoder", default=None, metavar="DIR",
                 help="the run directory of the decoder (default: <workdir>/decoder; "
                      "<workdir>/sft is the instruction-tuned one of `cm3leon sft`)")
  p.add_argument("--bundle", default=None, metavar="DIR",
                 help="generate from a `cm3leon export` bundle instead of a workdir (its own "
                      "config; --config.decoding.* overrides apply; output default ./samples)")
  p.add_argument("--columns", type=int, default=8, help="images per row of grid.png")


# --- prompts ---------------------------------------------------------------------------------

def parse_rows(text: str | Sequence | None, grid: int, where: str) -> tuple[int, int]:
  """'START:END' or [start, end] -> code rows, checked against the code grid."""
  if text is None:
    return grid // 3, grid - grid // 3
  try:
    start, end = (text.split(":") if isinstance(text, str) else list(text))
    start, end = int(start), int(end)
  except (TypeError, ValueError):
    raise InputError(f"{where}: rows {text!r}: expected START:END (code rows)") from None
  if not 0 <= start < end <= grid:
    raise InputError(f"{where}: rows {start}:{end}: expected 0 <= start < end <= {grid} (the "
                     "image's code grid)")
  return start, end


def _prompt_from_line(line: str, task: str, where: str) -> dict:
  line = line.strip()
  if not line:
    raise InputError(f"{where}: empty prompt")
  if task == "text-to-image":
    return {"text": line}
  image, _, text = line.partition("\t")
  return {"image": image.strip(), "text": text.strip() or None}


def _prompt_from_json(record, task: str, where: str, base: str) -> dict:
  if not isinstance(record, dict):
    raise InputError(f"{where}: expected a JSON object")
  text, image = record.get("text"), record.get("image")
  if task == "text-to-image":
    if not isinstance(text, str) or not text.strip():
      raise InputError(f"{where}: text-to-image needs a non-empty string 'text'")
    return {"text": text.strip()}
  if not isinstance(image, str) or not image:
    raise InputError(f"{where}: {task} needs an 'image' path")
  if text is not None and not isinstance(text, str):
    raise InputError(f"{where}: 'text' must be a string")
  out = {"image": os.path.join(base, image), "text": (text or "").strip() or None}
  if "rows" in record:
    out["rows"] = record["rows"]
  return out


def load_prompts(task: str, prompts: Sequence[str], prompts_file: str | None) -> list[dict]:
  """Prompts as dicts ('text', 'image', 'rows'); every bad one is an InputError naming it."""
  if prompts and prompts_file:
    raise InputError("give --prompt or --prompts-file, not both")
  if prompts:
    return [_prompt_from_line(p, task, f"--prompt {i + 1}") for i, p in enumerate(prompts)]
  if not prompts_file:
    raise InputError("no prompts: give --prompt TEXT (repeatable) or --prompts-file FILE")
  if not os.path.isfile(prompts_file):
    raise InputError(f"{prompts_file}: prompts file not found")
  base = os.path.dirname(os.path.abspath(prompts_file))
  out = []
  try:
    with open(prompts_file, encoding="utf-8") as f:
      for line_no, line in enumerate(f, 1):
        if not line.strip():
          continue
        where = f"{prompts_file}:{line_no}"
        if prompts_file.endswith(".jsonl"):
          try:
            record = json.loads(line)
          except json.JSONDecodeError as e:
            raise InputError(f"{where}: malformed JSON ({e.msg})") from None
          out.append(_prompt_from_json(record, task, where, base))
        else:
          prompt = _prompt_from_line(line, task, where)
          if "image" in prompt:
            prompt["image"] = os.path.join(base, prompt["image"])
          out.append(prompt)
  except UnicodeDecodeError as e:
    raise InputError(f"{prompts_file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
  if not out:
    raise InputError(f"{prompts_file}: no prompts (the file is empty)")
  return out


def load_images(prompts: Sequence[dict], size: int) -> np.ndarray:
  from cm3leon_jax.data.images import load_image
  return np.stack([load_image(p["image"], size) for p in prompts])


# --- tasks -----------------------------------------------------------------------------------

def _write_jsonl(path: str, records: Sequence[dict]) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  os.replace(tmp, path)


def generate(task: str, generator, prompts: Sequence[dict], out_dir: str, *, rows=None,
             num_candidates=None, num_retrieved=None, seed=None, columns: int = 8) -> list[dict]:
  """Run `task` on `prompts` with a decode.api.Generator; write grid.png, the images and
  outputs.jsonl into out_dir. Returns the JSONL records."""
  from cm3leon_jax.eval import grids
  config = generator.config
  os.makedirs(out_dir, exist_ok=True)
  records = []
  if task == "text-to-image":
    texts = [p["text"] for p in prompts]
    k = config.decoding.num_retrieved if num_retrieved is None else num_retrieved
    result = generator.text_to_image(texts, num_candidates=num_candidates,
                                     num_retrieved=k if generator.retriever is not None else 0,
                                     seed=seed)
    for i, (text, image) in enumerate(zip(texts, result.images_BHWC)):
      name = f"{i:03d}.png"
      grids.save_png(image, os.path.join(out_dir, name))
      scores = None if result.scores_BN is None else [float(s) for s in result.scores_BN[i]]
      records.append({"index": i, "task": task, "text": text, "output": name,
                      "candidate_scores": scores, "retrieved": [int(r) for r in result.retrieved[i]]})
    grid = grids.captioned_grid(result.images_BHWC, texts, columns=columns)
  elif task == "caption":
    images = load_images(prompts, config.vq.image_size)
    captions = generator.caption(images, seed=seed or 0)
    for i, (p, caption) in enumerate(zip(prompts, captions)):
      records.append({"index": i, "task": task, "image": p["image"], "caption": caption})
    grid = grids.captioned_grid(images, captions, columns=columns)
  elif task == "infill":
    images = load_images(prompts, config.vq.image_size)
    g = generator.image_tokenizer.grid
    bands = [parse_rows(p.get("rows", rows), g, f"prompt {i + 1}") for i, p in enumerate(prompts)]
    outputs = np.zeros_like(images)
    # Re-ranked pools as for text-to-image, when every prompt has a caption to rank against.
    captioned = all((p["text"] or "").strip() for p in prompts)
    if num_candidates is not None and num_candidates > 1 and not captioned:
      first = next(i for i, p in enumerate(prompts) if not (p["text"] or "").strip())
      raise InputError(f"--num-candidates={num_candidates}: infill prompt {first + 1} has no "
                       "caption to re-rank its candidates against")
    n = num_candidates if num_candidates is not None else (
        config.decoding.num_candidates if captioned and generator.retriever is not None else 1)
    for band in sorted(set(bands)):  # one decode call per band: the span length is static
      idx = [i for i, b in enumerate(bands) if b == band]
      region = np.zeros((g, g), bool)
      region[band[0]:band[1]] = True
      outputs[idx] = generator.infill_image(images[idx], [prompts[i]["text"] for i in idx],
                                            region.reshape(-1), num_candidates=n, seed=seed or 0)
    masked = images.copy()
    size = images.shape[1]
    for image, (r0, r1) in zip(masked, bands):
      image[r0 * size // g:r1 * size // g] = 128
    for i, (p, band, image) in enumerate(zip(prompts, bands, outputs)):
      name = f"{i:03d}.png"
      grids.save_png(image, os.path.join(out_dir, name))
      records.append({"index": i, "task": task, "image": p["image"], "text": p["text"],
                      "rows": list(band), "output": name})
    grid = grids.infill_grid(images, masked, outputs)
  else:
    raise InputError(f"--task {task}: expected one of {TASKS}")
  grids.save_png(grid, os.path.join(out_dir, "grid.png"))
  _write_jsonl(os.path.join(out_dir, "outputs.jsonl"), records)
  return records


def run(args, config) -> int:
  from cm3leon_jax import export
  from cm3leon_jax.decode.api import Generator
  config = export.cli_config(args, config)  # a bundle's config: prompts are checked against it
  prompts = load_prompts(args.task, args.prompt, args.prompts_file)
  if args.task == "infill" and args.rows is not None:
    from cm3leon_jax.configs.base import tokens_per_image
    parse_rows(args.rows, int(round(tokens_per_image(config) ** 0.5)), "--rows")
  if args.num_candidates is not None and args.num_candidates < 1:
    raise InputError(f"--num-candidates={args.num_candidates}: must be >= 1")
  if args.columns < 1:
    raise InputError(f"--columns={args.columns}: must be >= 1")
  if args.task != "text-to-image":
    load_images(prompts, config.vq.image_size)  # a bad image fails before the model loads
  out_dir = args.output or ("samples" if args.bundle else artifacts(config).samples)
  generator = (Generator.load_bundle(config) if args.bundle
               else Generator.load(config, step=args.step, decoder_dir=args.decoder))
  records = generate(args.task, generator, prompts, out_dir, rows=args.rows,
                     num_candidates=args.num_candidates, num_retrieved=args.num_retrieved,
                     seed=args.seed, columns=args.columns)
  for r in records:
    if args.task == "caption":
      print(f"{r['image']}: {r['caption'] or '(empty caption)'}")
  print(f"generate {args.task}: {len(records)} outputs -> {os.path.join(out_dir, 'grid.png')}, "
        f"{os.path.join(out_dir, 'outputs.jsonl')}")
  return 0
