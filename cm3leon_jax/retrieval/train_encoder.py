"""`cm3leon train-retriever`: contrastive (InfoNCE) training of the dual encoder.

    cm3leon train-retriever --config quickstart [--steps N]

Reads image-text pairs (the dataset's train split), tokenises captions with the project's text
tokenizer (with `retrieval.hard_negatives`, also each caption with one `swap_groups` word
swapped: an extra negative of its image, NegCLIP), and trains data-parallel on the config's
('data', 'fsdp', 'tensor') mesh: the global batch is split over data x fsdp, parameters follow
the logical axis rules, and the InfoNCE logits span the whole global batch (XLA gathers the
embeddings). With `retrieval.pack_text` (default) the captions and negatives reach the text
tower packed several per row (text_packing.py). Orbax checkpoints hold the model, the
optimizer and the Grain iterator, so an interrupted run resumes exactly.
Checkpoints and metrics.jsonl go to `artifacts(config).retriever`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm import tqdm

from cm3leon_jax.data import word_swap
from cm3leon_jax.errors import InputError
from cm3leon_jax.paths import artifacts
from cm3leon_jax.retrieval import pairs, text_packing
from cm3leon_jax.retrieval.encoder import DualEncoder, EncoderConfig, Embedder, info_nce, tokenize
from cm3leon_jax.train import mesh as mesh_lib

ITEMS = ("model", "optimizer", "data")


# --- Set up model and optimizer -------------------------------------------------------------
def make_optimizer(config, steps: int) -> optax.GradientTransformation:
  r = config.retrieval
  warmup = max(1, min(steps // 10, 500))
  schedule = optax.warmup_cosine_decay_schedule(0.0, r.learning_rate, warmup,
                                                max(steps, warmup + 1),
                                                end_value=r.learning_rate * 0.1)
  # CLIP's recipe: AdamW with a short beta2 horizon; no decay on the temperature.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.1,
                                 mask=decay_mask))


def init_sharded(config, mesh, steps: int, seed: int = 0):
  """(model, optimizer) created directly with their shardings (JAX_NOTES.md, NNX sharded init)."""
  cfg = EncoderConfig.from_config(config)
  tx = make_optimizer(config, steps)

  def make():
    model = DualEncoder(cfg, rngs=nnx.Rngs(seed))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  with jax.set_mesh(mesh), nnx.logical_axis_rules(mesh_lib.axis_rules(config)):
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    shardings = nnx.get_named_sharding(abstract, mesh)
    state = jax.jit(lambda: nnx.state(make()), out_shardings=shardings)()
  return nnx.merge(graphdef, state)


# --- Input pipeline -------------------------------------------------------------------------
class _Prepare(grain.transforms.RandomMap):
  """Tokenise a pair; with probability `hard_negatives`, also its caption with one word of
  `groups` swapped (an all-False neg_mask when there is none)."""

  # Captions come round every epoch and their swaps from a small set: each distinct text is
  # tokenised once (up to this many texts; 2-core EPYC, quickstart, second epoch: 85 -> 66 ms of
  # CPU per 256-pair batch, time the train step shares the two cores with).
  MEMO_LIMIT = 1 << 18

  def __init__(self, tokenizer, max_len, hard_negatives=0.0, groups=()):
    self.tokenizer, self.max_len = tokenizer, max_len
    self.hard_negatives, self.groups = float(hard_negatives), word_swap.parse_groups(groups)
    self._ids = {}  # text -> its token ids, cut to max_len

  def _tokenize(self, texts) -> tuple[np.ndarray, np.ndarray]:
    """(ids_BL, mask_BL) of `texts` as encoder.tokenize gives them, tokenising only the texts
    not seen before."""
    rows = [self._ids.get(t) for t in texts]
    missing = [t for t, row in zip(texts, rows) if row is None]
    if missing:
      ids, mask = tokenize(self.tokenizer, missing, self.max_len)  # one batched call
      fresh = {t: row[m] for t, row, m in zip(missing, ids, mask)}
      if len(self._ids) < self.MEMO_LIMIT:
        self._ids.update(fresh)
      rows = [fresh[t] if row is None else row for t, row in zip(texts, rows)]
    ids = np.zeros((len(texts), self.max_len), np.int32)
    mask = np.zeros((len(texts), self.max_len), bool)
    for r, row in enumerate(rows):
      ids[r, :len(row)] = row
      mask[r, :len(row)] = True
    return ids, mask

  def random_map(self, example, rng: np.random.Generator):
    text = example["text"]
    text = text.decode("utf-8") if isinstance(text, (bytes, np.bytes_)) else str(text)
    out = {"image": np.asarray(example["image"], np.uint8)}
    with_negative = self.hard_negatives > 0
    neg = None
    if with_negative and rng.random() < self.hard_negatives:
      neg = word_swap.random_swap(text, self.groups, rng)
    texts = [text, neg or ""] if with_negative else [text]
    ids, mask = self._tokenize(texts)
    out["ids"], out["mask"] = ids[0], mask[0]
    if with_negative:
      out["neg_ids"], out["neg_mask"] = ids[1], mask[1] & (neg is not None)
    return out


class _PackTexts(grain.transforms.Map):
  """A tokenised batch -> the same batch with its captions (and hard negatives) packed several
  per row (retrieval/text_packing.py): keys image, text_ids / _positions / _segments /
  _owners [R, L], and with hard negatives neg_valid [B]. Owners index the step's global text
  order: every process's captions (process order), then every process's negatives."""

  def __init__(self, global_batch: int):
    self.global_batch = global_batch

  def map(self, batch):
    b = batch["ids"].shape[0]
    offset = jax.process_index() * b
    ids, mask, owners = [batch["ids"]], [batch["mask"]], [offset + np.arange(b)]
    out = {"image": batch["image"]}
    if "neg_ids" in batch:
      ids.append(batch["neg_ids"])
      mask.append(batch["neg_mask"])
      owners.append(self.global_batch + offset + np.arange(b))
      out["neg_valid"] = batch["neg_mask"].any(axis=1)
    packed = text_packing.pack(np.concatenate(ids), np.concatenate(mask), np.concatenate(owners),
                               self.global_batch * len(ids), jax.local_device_count())
    out.update({f"text_{k}": v for k, v in packed.items()})
    return out


def pair_dataset(source, tokenizer, config, local_batch: int, seed: int) -> grain.IterDataset:
  """Shuffled, repeated, tokenised batches of this process's share of `source` (random-access
  pairs {'image': uint8 HxWx3, 'text': str|bytes}), each held in memory once read where they
  fit `retrieval.pairs_in_memory_mb` (pairs.HeldPairs); with `retrieval.pack_text`, the texts
  packed several per row (`_PackTexts`)."""
  if len(source) < local_batch:
    raise InputError(f"the training set has {len(source)} pairs, fewer than one batch of "
                     f"{local_batch} (--config.retrieval.batch_size)")
  r = config.retrieval
  if not 0.0 <= r.hard_negatives <= 1.0:
    raise InputError(f"--config.retrieval.hard_negatives={r.hard_negatives}: a probability, "
                     "expected 0..1")
  if r.hard_negatives > 0 and not word_swap.parse_groups(r.swap_groups):
    raise InputError("--config.retrieval.hard_negatives > 0 needs --config.retrieval.swap_groups "
                     "with a group of at least two words")
  share = range(jax.process_index(), len(source), jax.process_count())
  held = pairs.HeldPairs.fitting(source, share, float(r.get("pairs_in_memory_mb", 0)))
  # The same items in the same order either way: the same batches.
  ds = (grain.MapDataset.source(held) if held is not None
        else grain.MapDataset.source(source)[jax.process_index()::jax.process_count()])
  prepare = _Prepare(tokenizer, r.text_max_len, r.hard_negatives, r.swap_groups)
  ds = ds.shuffle(seed=seed).repeat(None).random_map(prepare, seed=seed)
  # A few batches ahead is enough: grain's default (16 threads, 500 elements = 500 batches
  # here) kept building batches the run never used, on the cores the train step needs.
  ds = ds.batch(local_batch, drop_remainder=True)
  if r.get("pack_text", False):
    ds = ds.map(_PackTexts(local_batch * jax.process_count()))
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))


# --- Update step ----------------------------------------------------------------------------
def make_train_step(graphdef, state_shardings, mesh, hard_negatives: bool = False,
                    packed: bool = False):
  rows = mesh_lib.batch_sharding(mesh, 2)
  if packed:
    batch_shardings = {f"text_{k}": rows for k in ("ids", "positions", "segments", "owners")}
    if hard_negatives:
      batch_shardings["neg_valid"] = mesh_lib.batch_sharding(mesh, 1)
  else:
    batch_shardings = {"ids": rows, "mask": rows}
    if hard_negatives:
      batch_shardings.update(neg_ids=rows, neg_mask=rows)
  batch_shardings["image"] = mesh_lib.batch_sharding(mesh, 4)

  def step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)

    def packed_loss_fn(model):
      image_BE = model.embed_image(batch["image"])
      b = image_BE.shape[0]
      texts_NE = model.embed_packed_text(batch["text_ids"], batch["text_positions"],
                                         batch["text_segments"], batch["text_owners"],
                                         b * (2 if hard_negatives else 1))
      if not hard_negatives:
        return info_nce(texts_NE, image_BE, model.logit_scale())
      return info_nce(texts_NE[:b], image_BE, model.logit_scale(), texts_NE[b:],
                      batch["neg_valid"])

    def loss_fn(model):
      text_BE = model.embed_text(batch["ids"], batch["mask"])
      image_BE = model.embed_image(batch["image"])
      if not hard_negatives:
        return info_nce(text_BE, image_BE, model.logit_scale())
      neg_BE = model.embed_text(batch["neg_ids"], batch["neg_mask"])
      return info_nce(text_BE, image_BE, model.logit_scale(), neg_BE,
                      batch["neg_mask"].any(axis=1))

    (loss, accuracy), grads = nnx.value_and_grad(packed_loss_fn if packed else loss_fn,
                                                 has_aux=True)(model)
    optimizer.update(model, grads)
    metrics = {"loss": loss, "accuracy": accuracy, "temperature": 1.0 / model.logit_scale()}
    return nnx.state((model, optimizer)), metrics

  return jax.jit(step, donate_argnums=0, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, None))


# --- Checkpoints ----------------------------------------------------------------------------
def checkpoint_manager(directory: str, keep: int = 2) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
      item_names=ITEMS,
      item_handlers={"model": ocp.StandardCheckpointHandler(),
                     "optimizer": ocp.StandardCheckpointHandler(),
                     "data": grain.checkpoint.CheckpointHandler()})


def train(config, source, tokenizer, directory: str | None = None, steps: int | None = None,
          log_every: int = 25, progress: bool = True) -> dict:
  """Train (or resume) the dual encoder; returns the last logged metrics."""
  r = config.retrieval
  steps = int(steps or r.steps)
  directory = directory or artifacts(config).retriever
  mesh = mesh_lib.make_mesh(config.mesh)
  mesh_lib.check_batch(r.batch_size, mesh, "retrieval.batch_size")
  local_batch = r.batch_size // jax.process_count()
  model, optimizer = init_sharded(config, mesh, steps, seed=config.train.seed)
  graphdef, state = nnx.split((model, optimizer))
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  data_iter = iter(pair_dataset(source, tokenizer, config, local_batch, config.train.seed))

  manager = checkpoint_manager(directory)
  start = 0
  if manager.latest_step() is not None:  # resume model, optimizer and data position
    start = manager.latest_step()
    model_state, opt_state = nnx.state(model), nnx.state(optimizer)
    restored = manager.restore(start, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(_abstract(model_state)),
        optimizer=ocp.args.StandardRestore(_abstract(opt_state)),
        data=grain.checkpoint.CheckpointRestore(data_iter)))
    nnx.update(model, restored["model"])
    nnx.update(optimizer, restored["optimizer"])
    graphdef, state = nnx.split((model, optimizer))

  packed = bool(r.get("pack_text", False))
  if packed:
    _check_process_rows(mesh, r.batch_size)
  step_fn = make_train_step(graphdef, state_shardings, mesh, hard_negatives=r.hard_negatives > 0,
                            packed=packed)
  metrics_path = os.path.join(directory, "metrics.jsonl")
  # A finished run resumed with nothing left to do reports its last logged metrics, not NaNs.
  last = _last_logged(metrics_path, start) if start >= steps else {}
  bar = tqdm(range(start, steps), initial=start, total=steps, desc="train-retriever",
             disable=not progress, dynamic_ncols=True)
  t0 = time.time()
  with open(metrics_path, "a") as metrics_file:
    for step in bar:
      batch = next(data_iter)
      if packed and jax.process_count() > 1:  # one global shape: every process's row count
        batch = _same_rows(batch, r.hard_negatives > 0, r.batch_size)
      batch = mesh_lib.global_batch(batch, mesh)
      state, metrics = step_fn(state, batch)
      done = step + 1
      if done % log_every == 0 or done == steps:
        last = {k: float(v) for k, v in metrics.items()}
        last.update(step=done, seconds=round(time.time() - t0, 2))
        metrics_file.write(json.dumps(last) + "\n")
        metrics_file.flush()
        bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['accuracy']:.2f}",
                        T=f"{last['temperature']:.3f}")
        if not np.isfinite(last["loss"]):
          raise FloatingPointError(f"train-retriever: loss is {last['loss']} at step {done}; "
                                   "lower --config.retrieval.learning_rate")
      if done % config.train.checkpoint_every == 0 or done == steps:
        nnx.update((model, optimizer), state)
        _save(manager, done, model, optimizer, data_iter)
  manager.wait_until_finished()
  manager.close()
  return last


def _check_process_rows(mesh, global_batch: int) -> None:
  """Packed texts name their pair by global index, process p's pairs being p*b .. p*b+b-1
  (`_PackTexts`): true where the mesh puts each process's devices on one block of the batch
  axes in process order (every mesh train/mesh.py builds); anything else is a clear error."""
  index = mesh_lib.batch_sharding(mesh, 1).addressable_devices_indices_map((global_batch,))
  check_row_block([s[0] for s in index.values()], jax.process_index(), jax.process_count(),
                  global_batch)


def check_row_block(row_slices, process: int, processes: int, global_batch: int) -> None:
  """`row_slices`: the batch rows of each of `process`'s devices (slices of `global_batch`).
  Together they must be one block, process * b .. process * b + b - 1 (b = global_batch /
  processes), the rows packed texts' owners assume; else a clear error."""
  local = global_batch // processes
  starts = sorted({s.start or 0 for s in row_slices})
  stops = sorted({global_batch if s.stop is None else s.stop for s in row_slices})
  expected = process * local
  if starts[0] != expected or stops[-1] != expected + local or any(
      a != b for a, b in zip(stops[:-1], starts[1:])):
    raise InputError(f"--config.retrieval.pack_text: this mesh gives process {process} batch "
                     f"rows {starts[0]}..{stops[-1]}, not one block {expected}..{expected + local}"
                     "; set --config.retrieval.pack_text=False")


def _same_rows(batch: dict, hard_negatives: bool, global_batch: int) -> dict:
  """This process's packed batch padded to the most rows any process packed this step."""
  from jax.experimental import multihost_utils
  rows = int(np.max(multihost_utils.process_allgather(np.int32(batch["text_ids"].shape[0]))))
  texts = {k[len("text_"):]: v for k, v in batch.items() if k.startswith("text_")}
  padded = text_packing.pad_rows(texts, rows, global_batch * (2 if hard_negatives else 1))
  return {**batch, **{f"text_{k}": v for k, v in padded.items()}}


def _last_logged(metrics_path: str, step: int) -> dict:
  """The metrics.jsonl record of `step` (the last one written), or just the step."""
  try:
    with open(metrics_path) as f:
      records = [json.loads(line) for line in f if line.strip()]
  except (OSError, json.JSONDecodeError):
    records = []
  return next((r for r in reversed(records) if r.get("step") == step), {"step": step})


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _save(manager, step, model, optimizer, data_iter):
  manager.save(step, args=ocp.args.Composite(
      model=ocp.args.StandardSave(nnx.state(model)),
      optimizer=ocp.args.StandardSave(nnx.state(optimizer)),
      data=grain.checkpoint.CheckpointSave(data_iter)), force=True)


def load_embedder(config, directory: str | None = None, step: int | None = None,
                  tokenizer=None, batch_size: int = 256) -> Embedder:
  """The trained encoder (model item only) + the text tokenizer, ready to embed."""
  from cm3leon_jax.tokenizers.text import TextTokenizer

  directory = directory or artifacts(config).retriever
  if not os.path.isdir(directory):
    raise InputError(f"{directory}: no retriever checkpoints; run `cm3leon train-retriever`")
  mesh = mesh_lib.make_mesh(config.mesh)
  manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=ITEMS,
                                  item_handlers={"model": ocp.StandardCheckpointHandler()})
  step = manager.latest_step() if step is None else step
  if step is None:
    raise InputError(f"{directory}: no retriever checkpoints; run `cm3leon train-retriever`")
  cfg = EncoderConfig.from_config(config)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(mesh_lib.axis_rules(config)):
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: DualEncoder(cfg, rngs=nnx.Rngs(0))))
    shardings = nnx.get_named_sharding(abstract, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          model=ocp.args.StandardRestore(target)))
    except (ValueError, KeyError) as e:
      raise InputError(f"{directory}: checkpoint {step} does not match --config.retrieval "
                       f"({str(e).splitlines()[0][:200]})") from None
  manager.close()
  model = nnx.merge(graphdef, restored["model"])
  if tokenizer is None:
    tokenizer = TextTokenizer.load(artifacts(config).text_tokenizer)
  return Embedder(model, tokenizer, mesh=mesh, batch_size=batch_size)


def recall_at_1(embedder: Embedder, images, texts) -> float:
  """Text-to-image recall@1 among the given pairs (pair i is the right answer for text i)."""
  t = embedder.embed_texts(texts)
  i = embedder.embed_images(images)
  return float(np.mean(np.argmax(t @ i.T, axis=1) == np.arange(len(t))))


# --- CLI ------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--steps", type=int, default=None, help="default: --config.retrieval.steps")
  p.add_argument("--eval-pairs", type=int, default=1000,
                 help="held-out pairs for the text-to-image recall@1 printed at the end")


def run(args, config) -> int:
  from cm3leon_jax.retrieval import pairs
  from cm3leon_jax.tokenizers.text import TextTokenizer

  tokenizer = TextTokenizer.load(artifacts(config).text_tokenizer)
  source = pairs.open_pairs(config, "train")
  last = train(config, source, tokenizer, steps=args.steps, progress=sys.stderr.isatty())
  print(f"train-retriever: step {last.get('step')} loss {last.get('loss', float('nan')):.4f} "
        f"in-batch accuracy {last.get('accuracy', float('nan')):.3f} -> "
        f"{artifacts(config).retriever}")
  if args.eval_pairs > 0:
    eval_source = pairs.open_pairs(config, "eval")
    n = min(args.eval_pairs, len(eval_source))
    images, texts = pairs.take(eval_source, n)
    r1 = recall_at_1(load_embedder(config, tokenizer=tokenizer), images, texts)
    print(f"held-out text-to-image recall@1 over {n} pairs: {r1:.3f} (chance {1 / n:.4f})")
  return 0
