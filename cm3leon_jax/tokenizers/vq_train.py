"""`cm3leon train-vq`: train the VQ image tokenizer (vq.py) data-parallel on the project mesh.

    python -m cm3leon_jax train-vq --config quickstart [--max-minutes 3]

Loss = reconstruction (vq.recon_loss: l1 | l2) + codebook + vq.commitment_cost * commitment
(+ vq.gan_weight * hinge patch-GAN generator loss from step vq.gan_start_step, when
gan_weight > 0). Dead codes are restarted after every update (vq.restart_dead_codes).
Writes under artifacts(config).vq: Orbax checkpoints (items model / opt / data; the Grain
iterator is saved too, so a resumed run sees exactly the images it would have seen),
metrics.jsonl (+ TensorBoard), and recon-<step>.png (originals above reconstructions).
"""

from __future__ import annotations

import argparse
import json
import math
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
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image
from tqdm import tqdm

from cm3leon_jax.errors import InputError
from cm3leon_jax.paths import artifacts
from cm3leon_jax.tokenizers import vq
from cm3leon_jax.train import mesh as mesh_lib


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--steps", type=int, default=None, help="total steps (default: vq.steps)")
  p.add_argument("--max-minutes", type=float, default=None,
                 help="stop (and checkpoint) after this much training time")
  p.add_argument("--log-every", type=int, default=50)
  p.add_argument("--checkpoint-every", type=int, default=500)
  p.add_argument("--eval-images", type=int, default=512, help="held-out images scored at the end")
  p.add_argument("--output", default=None, help="default: <workdir>/vq")


# --- patch-GAN discriminator (VQGAN's PatchGAN, slimmed: one logit per 4x4 patch) -----------
class PatchDiscriminator(nnx.Module):
  def __init__(self, width: int, *, rngs: nnx.Rngs):
    self.c1 = nnx.Conv(3, width, (4, 4), strides=2, rngs=rngs)
    self.c2 = nnx.Conv(width, 2 * width, (4, 4), strides=2, rngs=rngs)
    self.norm = vq._norm(2 * width, rngs)
    self.c3 = nnx.Conv(2 * width, 1, (3, 3), rngs=rngs)

  def __call__(self, x_BHWC):
    h = nnx.leaky_relu(self.c1(x_BHWC), 0.2)
    h = nnx.leaky_relu(self.norm(self.c2(h)), 0.2)
    return self.c3(h)


# --- model, optimisers, sharded state ------------------------------------------------------
def make_optimizer(c, steps: int) -> optax.GradientTransformation:
  # vq.warmup_steps = 0: the old default, 100 steps (a tenth of a short run).
  warmup = max(1, min(int(c.get("warmup_steps", 0)) or min(100, steps // 10), steps - 1))
  schedule = optax.warmup_cosine_decay_schedule(0.0, c.learning_rate, warmup, max(steps, warmup + 1),
                                                end_value=0.1 * c.learning_rate)
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule, b1=0.9, b2=0.99))


def init_train_state(config, steps: int, seed: int = 0):
  """(model, optimizer, extras) where extras = (discriminator, its optimizer) or ()."""
  c = config.vq
  rngs = nnx.Rngs(seed)
  model = vq.VQModel(c, rngs=rngs)
  optimizer = nnx.Optimizer(model, make_optimizer(c, steps), wrt=nnx.Param)
  extras = ()
  if c.gan_weight > 0:
    disc = PatchDiscriminator(int(c.base_channels), rngs=rngs)
    extras = (disc, nnx.Optimizer(disc, make_optimizer(c, steps), wrt=nnx.Param))
  return model, optimizer, extras


def recon_loss(x, y, kind: str):
  return jnp.mean(jnp.abs(x - y)) if kind == "l1" else jnp.mean((x - y) ** 2)


def psnr(images_a_uint8, images_b_uint8):
  mse = jnp.mean((images_a_uint8.astype(jnp.float32) - images_b_uint8.astype(jnp.float32)) ** 2)
  return 10.0 * jnp.log10(255.0 ** 2 / jnp.maximum(mse, 1e-10))


def make_train_step(graphdef, c, use_gan: bool):
  """A pure step (state, images_BHWC uint8, key) -> (state, metrics) for jax.jit."""

  def step(state, images_BHWC, key):
    model, optimizer, extras = nnx.merge(graphdef, state)
    x = vq.to_float(images_BHWC)

    key_restart, key_colour, key_scramble = jax.random.split(key, 3)

    def loss_fn(model):
      recon, q = model(x, key_scramble)
      rec = recon_loss(recon, x, c.recon_loss)
      loss = rec + q.codebook_loss + c.commitment_cost * q.commit_loss
      terms = {"recon": rec, "codebook": q.codebook_loss, "commit": q.commit_loss}
      if use_gan:
        g = -jnp.mean(extras[0](recon))
        loss = loss + c.gan_weight * g
        terms["gan_g"] = g
      return loss, (terms, recon, q)

    (loss, (terms, recon, q)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    codebook, usage, restarted = vq.restart_dead_codes(
        model.codebook[...], model.usage[...], jax.lax.stop_gradient(q.z_ND), q.err_N,
        q.codes_BN // max(1, model.colour_codes), key_restart, c.dead_code_threshold)
    model.codebook[...] = codebook
    model.usage[...] = usage
    colour_metrics = {}
    if q.colour is not None:
      qc = q.colour
      codebook, usage, restarted_colour = vq.restart_dead_codes(
          model.colour_codebook[...], model.colour_usage[...], jax.lax.stop_gradient(qc.z_ND),
          qc.err_N, qc.codes_BN, key_colour, c.dead_code_threshold)
      model.colour_codebook[...] = codebook
      model.colour_usage[...] = usage
      colour_share = vq.code_histogram(qc.codes_BN, model.colour_codes)
      colour_metrics = {"colour_usage": jnp.mean(colour_share > 0),
                        "colour_perplexity": vq.perplexity(colour_share),
                        "colour_restarted": restarted_colour}
    if use_gan:
      disc, disc_opt = extras
      fake = jax.lax.stop_gradient(recon)

      def disc_loss(disc):  # hinge loss
        return (jnp.mean(jax.nn.relu(1.0 - disc(x))) + jnp.mean(jax.nn.relu(1.0 + disc(fake))))

      d_loss, d_grads = nnx.value_and_grad(disc_loss)(disc)
      disc_opt.update(disc, d_grads)
      terms["gan_d"] = d_loss
    # Usage of the (geometry) codebook: with factorised codes, token g * C + c has g = // C.
    share = vq.code_histogram(q.codes_BN // max(1, model.colour_codes),
                              model.codebook[...].shape[0])
    metrics = {"loss": loss, **terms, "psnr": psnr(images_BHWC, vq.to_uint8(recon)),
               "batch_usage": jnp.mean(share > 0), "batch_perplexity": vq.perplexity(share),
               "restarted": restarted, **colour_metrics}
    return nnx.state((model, optimizer, extras)), metrics

  return step


# --- data -----------------------------------------------------------------------------------
def _image_of(element):
  return np.asarray(element["image"] if isinstance(element, dict) else element, np.uint8)


def train_dataset(source, global_batch: int, seed: int) -> grain.IterDataset:
  """Shuffled (reshuffled every epoch), endless, this process's share of each global batch."""
  n, i = jax.process_count(), jax.process_index()
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
  ds = ds[i::n].map(_image_of).batch(global_batch // n, drop_remainder=True)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))


def eval_images(source, count: int) -> np.ndarray:
  count = min(count, len(source))
  if count < 1:
    raise InputError("train-vq: the evaluation split is empty")
  return np.stack([_image_of(source[i]) for i in range(count)])


# --- evaluation and pictures -----------------------------------------------------------------
def evaluate(tokenizer: vq.ImageTokenizer, images: np.ndarray, batch: int, shapes: bool) -> dict:
  """Held-out PSNR, codebook usage/perplexity over all codes and (Shapes) analyzer accuracy."""
  codes = np.concatenate([tokenizer.encode(images[i:i + batch])
                          for i in range(0, len(images), batch)])
  recons = np.concatenate([tokenizer.decode(codes[i:i + batch])
                           for i in range(0, len(codes), batch)])
  share = np.asarray(vq.code_histogram(jnp.asarray(codes), tokenizer.codebook_size))
  mse = np.mean((images.astype(np.float64) - recons.astype(np.float64)) ** 2)
  out = {"eval_psnr": float(10 * np.log10(255.0 ** 2 / max(mse, 1e-10))),
         "eval_usage": float(np.mean(share > 0)),
         "eval_perplexity": float(vq.perplexity(jnp.asarray(share)))}
  if shapes:
    out.update(analyzer_scores(images, recons))
  return out, recons


def analyzer_scores(originals: np.ndarray, recons: np.ndarray) -> dict:
  """Shapes analyzer accuracy of reconstructions against the scene parsed from the original.

  The analyzer recovers every attribute of clean renders (issue 3), so the parse of the
  original is the scene's ground truth. score_scene checks objects only; analyzer_background is
  the share whose nearest named background survives (captions name it, and an over-high
  learning rate kept the objects but washed every background to one grey, issue 4).
  """
  from cm3leon_jax.data import analyzer
  truths = [analyzer.parse_scene(o) for o in originals]
  scores = [analyzer.score_scene(r, t) for r, t in zip(recons, truths)]
  out = {f"analyzer_{k}": float(v) for k, v in analyzer.mean_scores(scores).items()}
  out["analyzer_background"] = float(np.mean(
      [analyzer.parse_scene(r).background == t.background for r, t in zip(recons, truths)]))
  return out


def save_grid(path: str, originals: np.ndarray, recons: np.ndarray, count: int = 16) -> None:
  """Originals (top row) above reconstructions (bottom row), written atomically."""
  top = np.concatenate(list(originals[:count]), axis=1)
  bottom = np.concatenate(list(recons[:count]), axis=1)
  grid = np.concatenate([top, bottom], axis=0)
  scale = max(1, 128 // originals.shape[1])
  img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
  tmp = path + ".tmp.png"
  img.save(tmp)
  os.replace(tmp, path)


def _opt_item(pure: dict) -> dict:
  """The 'opt' checkpoint item: optimiser state, plus discriminator state when there is one."""
  return {"optimizer": pure[1], **({"extras": pure[2]} if 2 in pure else {})}


# --- the loop ----------------------------------------------------------------------------------
def train(config, train_source, eval_source, output: str, steps: int | None = None,
          max_minutes: float | None = None, log_every: int = 50, checkpoint_every: int = 500,
          num_eval_images: int = 512, progress: bool = True) -> dict:
  """Train (resuming from `output` if it holds checkpoints); returns the final eval metrics."""
  c = config.vq
  steps = int(steps or c.steps)
  output = os.path.abspath(output)
  os.makedirs(output, exist_ok=True)
  cfg_path = os.path.join(output, vq.CONFIG_FILE)
  if os.path.exists(cfg_path):
    vq.check_checkpoint_config(output, c)  # refuse to resume a different architecture
  else:
    with open(cfg_path + ".tmp", "w") as f:
      json.dump(vq.arch_dict(c), f, indent=1)
    os.replace(cfg_path + ".tmp", cfg_path)

  # Set up mesh: params replicated, the batch split over ('data', 'fsdp').
  mesh = mesh_lib.make_mesh(config.mesh)
  mesh_lib.check_batch(int(c.batch_size), mesh, "vq.batch_size")
  replicated = NamedSharding(mesh, P())
  model, optimizer, extras = init_train_state(config, steps, int(config.train.seed))
  graphdef, state = nnx.split((model, optimizer, extras))
  state = jax.device_put(state, replicated)
  data_it = iter(train_dataset(train_source, int(c.batch_size), int(config.data.shuffle_seed)))

  # Load checkpoint.
  mngr = ocp.CheckpointManager(
      output, options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True),
      item_names=("model", "opt", "data"),
      item_handlers={"model": ocp.StandardCheckpointHandler(),
                     "opt": ocp.StandardCheckpointHandler(),
                     "data": grain.checkpoint.CheckpointHandler()})
  start = mngr.latest_step() or 0
  if start:
    pure = state.to_pure_dict()
    restored = mngr.restore(start, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(pure[0]),
        opt=ocp.args.StandardRestore(_opt_item(pure)),
        data=grain.checkpoint.CheckpointRestore(data_it)))
    opt = restored["opt"]
    nnx.replace_by_pure_dict(state, {0: restored["model"], 1: opt["optimizer"],
                                     **({2: opt["extras"]} if "extras" in opt else {})})
    state = jax.device_put(state, replicated)

  def save(step):
    pure = state.to_pure_dict()
    mngr.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(pure[0]),
        opt=ocp.args.StandardSave(_opt_item(pure)),
        data=grain.checkpoint.CheckpointSave(data_it)))

  # Update step: one compiled variant without and one with the GAN (from gan_start_step).
  batch_sharding = mesh_lib.batch_sharding(mesh, 4)
  state_sharding = jax.tree.map(lambda _: replicated, state)
  jitted = {gan: jax.jit(make_train_step(graphdef, c, gan), donate_argnums=0,
                         in_shardings=(state_sharding, batch_sharding, replicated),
                         out_shardings=(state_sharding, replicated))
            for gan in ({False, c.gan_weight > 0})}
  key = jax.random.key(int(config.train.seed))
  metrics_path = os.path.join(output, "metrics.jsonl")
  log = open(metrics_path, "a")
  t0, step, window = time.time(), start, []
  bar = tqdm(total=steps, initial=start, desc="train-vq", disable=not progress, file=sys.stderr)
  with jax.set_mesh(mesh):
    while step < steps:
      batch = mesh_lib.global_batch({"images": next(data_it)}, mesh)["images"]
      use_gan = c.gan_weight > 0 and step >= c.gan_start_step
      state, m = jitted[use_gan](state, batch, jax.random.fold_in(key, step))
      step += 1
      bar.update(1)
      window.append(m)
      if step % log_every == 0 or step == steps:
        row = {k: float(np.mean([float(w[k]) for w in window])) for k in window[-1]}
        window = []
        row.update(step=step, time_s=round(time.time() - t0, 2))
        log.write(json.dumps(row) + "\n")
        log.flush()
        bar.set_postfix(loss=f"{row['loss']:.4f}", psnr=f"{row['psnr']:.1f}",
                        usage=f"{row['batch_usage']:.2f}")
      if step % checkpoint_every == 0:
        save(step)
      if max_minutes is not None and time.time() - t0 > 60 * max_minutes:
        break
  bar.close()
  if mngr.latest_step() != step:
    save(step)
  mngr.wait_until_finished()
  mngr.close()

  # Evaluate the final tokenizer on held-out images.
  model = nnx.merge(graphdef, state)[0]
  tokenizer = vq.ImageTokenizer(model, mesh)
  images = eval_images(eval_source, num_eval_images)
  result, recons = evaluate(tokenizer, images, int(c.batch_size),
                            shapes=config.data.dataset == "shapes")
  result.update(step=step, train_time_s=round(time.time() - t0, 1), final=True)
  log.write(json.dumps(result) + "\n")
  log.close()
  save_grid(os.path.join(output, f"recon-{step:06d}.png"), images, recons)
  return result


def run(args, config) -> int:
  from cm3leon_jax.data import sources
  output = args.output or artifacts(config).vq
  train_source = sources.image_source(config, "train")
  eval_source = sources.image_source(config, "eval")
  result = train(config, train_source, eval_source, output, steps=args.steps,
                 max_minutes=args.max_minutes, log_every=args.log_every,
                 checkpoint_every=args.checkpoint_every, num_eval_images=args.eval_images,
                 progress=sys.stderr.isatty())
  print("train-vq: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in result.items()) + f" -> {output}")
  return 0
