"""Named evaluation suites on Shapes: what `cm3leon eval --suite NAME` measures.

    metrics, figures = run_suite("quickstart", config, generator, embedder)
    report.write(out_dir, metrics, figures)

Stages (each reads its counts from `config.eval`):
- text_to_image: held-out single-object prompts (the `heldout` split: colour-shape pairs never
  seen in training; and as many from the `eval` split: unseen scenes of seen colour-shape
  pairs), `num_candidates` samples each with the config's decoding (retrieval, CFG,
  pool, re-ranking), scored by the analyzer against the prompt's scene; the random-chance
  baseline beside it; CLIP score; Fréchet distance of the images against real held-out images,
  with the real-vs-real distance of as many images beside it (the floor at that sample size).
- binding: single-object eval scenes; does the decoder's likelihood of each image's codes
  prefer the scene's caption over the caption with one attribute word swapped (eval/binding.py),
  with no retrieved documents and with `decoding.num_retrieved`.
- captioning: eval images captioned (causal prompt, greedy); attribute recall of the captions
  against the ground-truth scenes, chance, and CIDEr-D against the dataset's caption.
- infilling: eval images with an object in grid row `infill_row`; the band of code rows over that
  row is masked and regenerated from the rest of the image and the caption; analyzer accuracy
  against the scene, between "band erased" (lower) and "VQ reconstruction" (upper) bounds.
- vqa (its own suite): one question per eval image (colour, shape, count, position in turn),
  answered greedily with the VQA task's template; VQAv2 accuracy per kind beside the language
  prior (the most frequent answer, image unseen).
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from cm3leon_jax.data import analyzer, shapes
from cm3leon_jax.errors import InputError
from cm3leon_jax.eval import attributes
from cm3leon_jax.eval.clip_score import clip_score
from cm3leon_jax.eval.features import feature_extractor
from cm3leon_jax.eval.fid import fid

SUITES = {
    "quickstart": ("text_to_image", "binding", "captioning", "infilling"),
    "text-to-image": ("text_to_image",),
    "captioning": ("captioning",),
    "infilling": ("infilling",),
    "binding": ("binding",),
    # Not in the quickstart suite: a pretrained decoder never saw the question template; this
    # measures an instruction-tuned checkpoint (REFERENCE.md section 6).
    "vqa": ("vqa",),
}
NUM_EXAMPLES = 8  # captions listed in the report
MASK_GREY = 128  # how the masked band is drawn in infill.png

Records = Callable[[str], Sequence[dict]]


def _take(source: Sequence[dict], keep: Callable[[dict], bool], count: int) -> list[dict]:
  """The first `count` records of a split that `keep` accepts (in index order)."""
  out = []
  for i in range(len(source)):
    if len(out) >= count:
      break
    record = source[i]
    if "scene" not in record:
      raise InputError(f"eval: {source!r} has no Shapes scenes; the suites need the shapes "
                       "dataset (--config.data.dataset=shapes)")
    if keep(record):
      out.append(record)
  return out


def _images(records: Sequence[dict]) -> np.ndarray:
  return np.stack([np.asarray(r["image"], np.uint8) for r in records])


def _fid_row(extract, images, floor_images, real_features) -> dict:
  """FID of `images` vs the real set, and of as many other real images (the noise floor)."""
  if len(images) < 2 or len(real_features) < 2:
    return {"num_images": len(images), "fid": None, "floor": None}
  row = {"num_images": len(images), "fid": fid(extract(images), real_features), "floor": None}
  if len(floor_images) >= 2:
    row["floor"] = fid(extract(floor_images), real_features)
  return row


# --- stages ----------------------------------------------------------------------------------

def pool_oracle(all_correct_N: Sequence[float], num_candidates: int) -> float:
  """Fraction of prompts whose pool holds at least one exactly right image: what a perfect
  re-ranker would score. `all_correct_N`: the 'all' score of every candidate, prompt-major."""
  rows = np.asarray(all_correct_N, np.float64).reshape(-1, num_candidates)
  return float(np.mean(rows.max(axis=1) >= 1.0))


def candidate_scores(images_NHW3, scenes, num_candidates: int) -> list[dict]:
  """The analyzer's score of every candidate (prompt-major) against its prompt's scene."""
  return [analyzer.score_scene(image, scene) for image, scene
          in zip(images_NHW3, [s for s in scenes for _ in range(num_candidates)])]


def vq_reconstruction(generator, images_BHWC: np.ndarray, scenes) -> dict:
  """Analyzer accuracy of the prompts' real renders after a VQ round trip: the most any
  decoder can reach through this VQ (it never saw a never-seen pair either)."""
  tok = generator.image_tokenizer
  return attributes.image_accuracy(tok.decode(tok.encode(images_BHWC)), scenes)


def text_to_image(config, generator, embedder, records: Records) -> tuple[dict, dict]:
  e, d = config.eval, config.decoding
  n_prompts, n_cand = int(e.num_prompts), int(e.num_candidates)
  if n_prompts < 1 or n_cand < 1:
    raise InputError("--config.eval.num_prompts and eval.num_candidates must be >= 1")
  single = lambda r: len(r["scene"].objects) == 1
  n_real = int(e.num_fid_real)
  # prompts, then the FID reference set, then more real images for the all-candidates floor.
  pool = _take(records("heldout"), single, n_prompts + n_real + n_prompts * (n_cand - 1))
  prompts_r = pool[:n_prompts]
  if not prompts_r:
    raise InputError("eval: the heldout split has no single-object scenes")
  real_ref = pool[n_prompts:n_prompts + n_real]
  extra = pool[n_prompts + n_real:]
  prompts = [r["text"] for r in prompts_r]
  scenes = [r["scene"] for r in prompts_r]
  num_retrieved = int(d.num_retrieved) if generator.retriever is not None else 0
  result = generator.text_to_image(prompts, num_candidates=n_cand, num_retrieved=num_retrieved,
                                   seed=int(e.seed))
  best, cands = result.images_BHWC, result.candidates_BNHWC
  flat = cands.reshape(-1, *cands.shape[2:])
  cand_scores = candidate_scores(flat, scenes, n_cand)
  out = {
      "num_prompts": len(prompts), "num_candidates": n_cand, "pool": d.pool,
      "cfg_weight": float(d.cfg_weight), "num_retrieved": num_retrieved,
      # Fewer when documents had to be dropped to fit the window (decode/api.py).
      "mean_retrieved": float(np.mean([len(r) for r in result.retrieved])),
      "reranked": result.scores_BN is not None,
      "accuracy": attributes.image_accuracy(best, scenes),
      "accuracy_candidates": analyzer.mean_scores(cand_scores),
      # Ceilings of the two stages after sampling: re-ranking can at best pick a right
      # candidate when the pool holds one; no decoder draws better than the VQ reconstructs.
      "pool_oracle": pool_oracle([c["all"] for c in cand_scores], n_cand),
      "vq_reconstruction": vq_reconstruction(generator, _images(prompts_r), scenes),
      "chance": attributes.chance(1),
      "prompts": prompts,
  }
  if embedder is not None:
    out["clip_score"] = {
        "best": clip_score(embedder, best, prompts),
        "candidates": clip_score(embedder, flat, [p for p in prompts for _ in range(n_cand)]),
        "real": clip_score(embedder, _images(prompts_r), prompts)}
  extract = feature_extractor(config, embedder)
  real_features = extract(_images(real_ref)) if len(real_ref) >= 2 else np.zeros((0, 1))
  # Floors: the prompts' own renders (for the best images); those plus further real images
  # (for all candidates), when the split has as many as there are candidates.
  floor_all = prompts_r + extra if len(prompts_r) + len(extra) == len(flat) else []
  # The same prompts' kind from the `eval` split: unseen scenes whose colour-shape pairs do
  # occur in training. Separates "draws what it was taught" from compositional generalisation.
  seen_r = _take(records("eval"), single, n_prompts)
  if seen_r:
    seen = generator.text_to_image([r["text"] for r in seen_r], num_candidates=n_cand,
                                   num_retrieved=num_retrieved, seed=int(e.seed))
    seen_flat = seen.candidates_BNHWC.reshape(-1, *seen.candidates_BNHWC.shape[2:])
    seen_scenes = [r["scene"] for r in seen_r]
    seen_scores = candidate_scores(seen_flat, seen_scenes, n_cand)
    out["seen_pairs"] = {
        "split": "eval", "num_prompts": len(seen_r),
        "accuracy": attributes.image_accuracy(seen.images_BHWC, seen_scenes),
        "accuracy_candidates": analyzer.mean_scores(seen_scores),
        "pool_oracle": pool_oracle([c["all"] for c in seen_scores], n_cand),
        "vq_reconstruction": vq_reconstruction(generator, _images(seen_r), seen_scenes)}
  out["fid"] = {
      "features": config.eval.fid_features, "num_real": len(real_ref),
      "best": _fid_row(extract, best, _images(prompts_r), real_features),
      "candidates": _fid_row(extract, flat, _images(floor_all) if floor_all else [],
                             real_features)}
  return out, {"samples": (best, prompts)}


def captioning(config, generator, embedder, records: Records) -> tuple[dict, dict]:
  from cm3leon_jax.eval.captioning import cider_d
  del embedder
  count = int(config.eval.num_captions)
  chosen = _take(records("eval"), lambda r: True, count)
  if not chosen:
    raise InputError("eval: the eval split is empty")
  scenes = [r["scene"] for r in chosen]
  references = [r["text"] for r in chosen]
  instruction = str(config.eval.caption_instruction).strip() or None
  captions = generator.caption(_images(chosen), instruction=instruction)
  ids = [str(i) for i in range(len(chosen))]
  cider = cider_d(dict(zip(ids, ([r] for r in references))), dict(zip(ids, captions)))
  return {
      "num_images": len(chosen),
      "instruction": instruction,
      "recall": attributes.caption_recall(captions, scenes),
      "reference_recall": attributes.caption_recall(references, scenes),
      "chance": attributes.chance_for_scenes(scenes),
      "cider_d": cider,
      "examples": [{"caption": c, "reference": r}
                   for c, r in zip(captions[:NUM_EXAMPLES], references)],
  }, {}


def binding(config, generator, embedder, records: Records) -> tuple[dict, dict]:
  """eval/binding.py on single-object eval-split scenes, without and with retrieval."""
  del embedder
  from cm3leon_jax.eval.binding import binding as attribute_binding
  count = int(config.eval.num_binding)
  if count < 1:
    raise InputError(f"--config.eval.num_binding={count}: must be >= 1")
  chosen = _take(records("eval"), lambda r: len(r["scene"].objects) == 1, count)
  if not chosen:
    raise InputError("eval: the eval split has no single-object scenes")
  captions, scenes = [r["text"] for r in chosen], [r["scene"] for r in chosen]
  codes = generator.image_tokenizer.encode(_images(chosen))
  ks = [0] + ([int(config.decoding.num_retrieved)] if generator.retriever is not None
              and int(config.decoding.num_retrieved) > 0 else [])
  return {"num_scenes": len(chosen), "split": "eval", "by_retrieved": {
      str(k): attribute_binding(lambda c, x, k=k: generator.image_nll(c, x, num_retrieved=k),
                                captions, scenes, codes) for k in ks}}, {}


def band_rows(grid_row: int, image_size: int, code_grid: int) -> tuple[int, int]:
  """Code rows [start, end) covering the pixel rows of 3x3 grid row `grid_row`."""
  if not 0 <= grid_row <= 2:
    raise InputError(f"--config.eval.infill_row={grid_row}: expected 0, 1 or 2")
  f = image_size / code_grid  # pixels per code
  y0, y1 = grid_row * image_size / 3, (grid_row + 1) * image_size / 3
  return int(np.floor(y0 / f)), int(np.ceil(y1 / f))


def infilling(config, generator, embedder, records: Records) -> tuple[dict, dict]:
  del embedder
  row = int(config.eval.infill_row)
  chosen = _take(records("eval"), lambda r: any(o.row == row for o in r["scene"].objects),
                 int(config.eval.num_infill))
  if not chosen:
    raise InputError(f"eval: no eval image has an object in grid row {row}")
  images = _images(chosen)
  scenes = [r["scene"] for r in chosen]
  tok = generator.image_tokenizer
  size, grid = images.shape[1], tok.grid
  r0, r1 = band_rows(row, size, grid)
  region = np.zeros((grid, grid), bool)
  region[r0:r1] = True
  y0, y1 = r0 * size // grid, r1 * size // grid
  # Re-ranked like text-to-image: eval.num_candidates infills per image, the dual encoder's pick.
  n = int(config.eval.num_candidates) if generator.retriever is not None else 1
  infilled = generator.infill_image(images, [r["text"] for r in chosen], region.reshape(-1),
                                    num_candidates=n, seed=int(config.eval.seed))
  erased = images.copy()
  for image, scene in zip(erased, scenes):
    image[y0:y1] = shapes.BACKGROUNDS[scene.background]
  masked = images.copy()
  masked[:, y0:y1] = MASK_GREY
  reconstructed = tok.decode(tok.encode(images))
  return {
      "num_images": len(chosen), "grid_row": row, "code_rows": [r0, r1], "num_candidates": n,
      "masked_fraction": (r1 - r0) / grid,
      "accuracy": attributes.image_accuracy(infilled, scenes),
      "erased": attributes.image_accuracy(erased, scenes),
      "reconstruction": attributes.image_accuracy(reconstructed, scenes),
  }, {"infill": (images, masked, infilled)}


def vqa(config, generator, embedder, records: Records) -> tuple[dict, dict]:
  """One question per eval image, the kinds of data/tasks.py in turn, answered greedily with
  the VQA template; VQAv2 accuracy (eval/vqa.py, one exact reference answer) per kind, beside
  the language prior: the most frequent answer of the kind among these questions, given
  without looking at the image."""
  del embedder
  from cm3leon_jax.data.tasks import VQA_KINDS, make_vqa
  from cm3leon_jax.eval.vqa import vqa_accuracy
  # A fraction, as every other metric here (mean_vqa_accuracy gives percent).
  mean_vqa_accuracy = lambda preds, refs: float(np.mean(list(map(vqa_accuracy, preds, refs))))
  count = int(config.eval.num_vqa)
  if count < 1:
    raise InputError(f"--config.eval.num_vqa={count}: must be >= 1")
  chosen = _take(records("eval"), lambda r: True, count)
  if not chosen:
    raise InputError("eval: the eval split is empty")
  rng = np.random.default_rng([int(config.eval.seed), 7])
  kinds = [VQA_KINDS[i % len(VQA_KINDS)] for i in range(len(chosen))]
  qa = [make_vqa(r["scene"], rng, kind) for r, kind in zip(chosen, kinds)]
  predictions = generator.answer(_images(chosen), [q for q, _ in qa])
  by_kind, prior = {}, {}
  for kind in VQA_KINDS:
    rows = [i for i, k in enumerate(kinds) if k == kind]
    if not rows:
      continue
    answers = [qa[i][1] for i in rows]
    common = max(sorted(set(answers)), key=answers.count)
    by_kind[kind] = mean_vqa_accuracy([predictions[i] for i in rows], [[a] for a in answers])
    prior[kind] = mean_vqa_accuracy([common] * len(rows), [[a] for a in answers])
  references = [[a] for _, a in qa]
  return {
      "num_questions": len(chosen), "split": "eval",
      "accuracy": mean_vqa_accuracy(predictions, references),
      "prior": float(np.mean([prior[kinds[i]] for i in range(len(chosen))])),
      "by_kind": by_kind, "prior_by_kind": prior,
      "examples": [{"question": q, "answer": a, "prediction": p}
                   for (q, a), p in zip(qa[:NUM_EXAMPLES], predictions)],
  }, {}


STAGES = {"text_to_image": text_to_image, "binding": binding, "captioning": captioning,
          "infilling": infilling, "vqa": vqa}


def run_suite(name: str, config, generator, embedder=None, records: Records | None = None,
              log: Callable[[str], None] = print) -> tuple[dict, dict]:
  """Run suite `name`; returns (metrics, figures) for report.write.

  records(split) gives a split's records ({'image', 'text', 'scene'}); default: the built
  dataset (data/sources.py). embedder: the dual encoder (CLIP score, FID features), or None.
  """
  if name not in SUITES:
    raise InputError(f"--suite {name}: unknown suite (choose from {', '.join(SUITES)})")
  if records is None:
    from cm3leon_jax.data.sources import image_text_source
    records = lambda split: image_text_source(config, split)
  metrics = {"suite": name, "preset": config.name, "seconds": {}}
  figures = {}
  for stage in SUITES[name]:
    log(f"eval {name}: {stage.replace('_', '-')} ...")
    start = time.time()
    metrics[stage], figs = STAGES[stage](config, generator, embedder, records)
    metrics["seconds"][stage] = time.time() - start
    figures.update(figs)
    log(f"eval {name}: {stage.replace('_', '-')} done in {metrics['seconds'][stage]:.1f} s")
  return metrics, figures
