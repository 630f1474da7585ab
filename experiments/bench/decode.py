"""Decoding speed: the compiled JAX sampler against Hugging Face `OPTForCausalLM.generate`.

    python experiments/bench/decode.py                 # bench preset, batch 1 and 8, +-CFG
    python experiments/bench/decode.py --repeats 1     # quicker, noisier
    python experiments/bench/decode.py --no-torch      # JAX only

Task (issue 8): text-to-image, a 32-token prompt `<eos> caption <break>`, then one image of
`tokens_per_image` tokens (1,024 for the `bench` preset) and its closing `<break>`: 1,025 new
tokens per image. With CFG the unconditional prompt `<eos> <mask:0> <break>` runs as a second
stream (JAX: both streams in one batch; HF: its `guidance_scale` logits processor, which runs
the unconditional prompt through the model beside the conditional batch).

Both sides: the same shape (d_model, layers, heads, ffn, vocab, ReLU, no biases, parameter-free
LayerNorms, tied embeddings), float32, random weights, KV caches, the same number of new tokens
(HF: min_new_tokens = max_new_tokens), ancestral sampling at temperature 1 with top-p 1 and no
top-k. The JAX sampler also applies the modality constraints (image ids only, then `<break>`).

Timing: medians of `--repeats` runs (fewer at batch >= 8, which take minutes on a 2-core CPU),
JAX and torch runs interleaved so that other jobs on a shared machine slow both alike. The
first (warm-up) call is excluded; its time is reported as the JAX compile time (the warm-up
runs prefill only: its rows start finished, so the decode loop exits at once). tokens/s counts
new tokens of the B prompts (not of the guidance streams); s/image = run time / B.

Torch threads: `--torch-threads auto` (default) times a few decode steps with the machine's
core count and with 1 thread and keeps the faster. On a loaded machine 2 OpenMP threads can be
10x slower than 1 (threads spin on barriers while the other is descheduled); picking the
faster makes the peer as fast as it can be here, so the ratio is conservative.

On a GPU (`jax.default_backend() == 'gpu'`, or `--bandwidth` anywhere) it also times the
`cm3leon_350m` preset (bf16 weights and cache) at batch 1 and compares the ms per token with
the memory-bandwidth bound: (weight bytes + mean KV-cache bytes read per token) / bandwidth of
the chip (table below; unknown chips print no bound). Target: >= 50% of the bound.

Measured on one H200 (2026-11-27, jax 0.11.2, torch 2.11 + transformers 5.17 on the same
GPU, float32 with TF32 matmuls on both sides, experiments/bench/gpu_checks.sh): JAX/HF tokens/s
12.3x (batch 1) and 12.9x (batch 8) without CFG, 21.5x and 22.8x with CFG (0.40 s per batch-1
image vs HF's 4.9 s): the 3x target is met on the GPU. The 350M bandwidth check: 1.29-1.43
ms/token against a 0.165 ms bound (736 MB of bf16 weights + 54 MB of mean KV cache at 4.8
TB/s): 11-13% of the bound, the 50% target not met. At batch 1 each step is ~400 small
kernels plus the loop's device-to-host predicate copies; XLA's command buffers (CUDA graphs)
for the while loop, tried with --xla_gpu_enable_command_buffer=...,WHILE,CONDITIONAL, moved it
by 1%. The full 4,096-slot cache is attended every step (403 MB, not the 54 MB counted).
After the q/k/v change below (1.55x on the CPU), the same GPU gave 1.297 ms/token: unchanged.
A profile (experiments/bench/gpu_profile.py, results/gpu-h200-2026-11-27/5-profile-before.log):
391 kernels per token; the device busy 65% of the wall time; 67% of the busy time in XLA
reduction fusions (the batch-1 matrix-vector products and attention over the cache, ~5-11 us
each, far below the bandwidth a 2-8 MB weight read allows); the GEMM class only 3%.
Re-measured on an H200 (2026-11-29, `--batches 1 --no-cfg --no-torch --repeats 2`) after the
sampler's [B * H, S, K] cache, cache windows and image-only head: 1.311 ms per token, 13% of
the 0.165 ms bound, unchanged (those cut bytes and work, and this is launch-bound); the bench
preset's batch-1 image 0.43 s. Logs: experiments/results/gpu-h200-2026-11-29/.
2026-12-04, H200, after the decode projections became fused Pallas matrix-vector kernels
(cm3leon_jax/model/matvec.py; `experiments/bench/matvec.py` runs this check with both modes):
`model.decode_matvec=xla` 1.304 ms/token (13%), `=pallas` (what `auto` picks on a GPU) **0.693
ms/token, 24% of the bound** (1.88x): 258 kernels per token, the device busy ~60% of a profiled
run's wall time; the four kernels per layer take 2.5-5.1 us each (0.8-1.7 TB/s), 59% of the
device time, the attention over the cache (XLA reductions and elementwise kernels, ~6 per
layer) and the cache writes the rest. The 50% target is still not met: it needs the kernels
nearer the bandwidth and the attention fused (results/gpu-h200-2026-12-04/).

Measured on a quiet 2-core CPU (2026-11-27, load 1.2-2.0, torch on 2 threads), after the q/k/v
projection stopped copying its stacked weights into a transposed layout inside every decode
step (same load before/after: 35 -> 23 s per batch-1 image):

| batch | CFG | JAX tok/s | s/image | HF tok/s | s/image | ratio |
|---|---|---|---|---|---|---|
| 1 | no | 85.7 | 11.96 | 96.5 | 10.63 | 0.89x |
| 1 | yes | 86.6 | 11.84 | 48.7 | 21.05 | 1.78x |
| 8 | no | 287.8 | 3.56 | 204.3 | 5.02 | 1.41x |
| 8 | yes | 193.5 | 5.30 | 113.8 | 9.01 | 1.70x |

The 3x target is not met on this CPU (earlier runs, loaded machine: 0.5-1.4x / 1.1-1.7x /
1.0-1.1x / 1.4-1.6x). At batch 1 both sides read the same 134 MB of float32 weights per token
(~10 ms/token each: the memory bandwidth of this machine); JAX wins with CFG because both
streams share one forward. Tried and rejected: keys cached transposed ([B, H, K, S]) so the
score dot reads them as stored: 29 s instead of 23 s per image. Known JAX-side costs left:
XLA's CPU dot copies every layer's keys to [H, K, S] each step, the static cache is attended in
full (about twice the written slots on average), and Gumbel sampling draws V random numbers per
row per step. The XLA CPU thread pool hurts on a loaded machine (--jax-single-thread).

Measured again a day later on another 2-core machine (AMD EPYC, load 1.8-2.4,
`python experiments/bench/decode.py`), same code:

| batch | CFG | JAX tok/s | s/image | HF tok/s | s/image | ratio | CPU-s ratio |
|---|---|---|---|---|---|---|---|
| 1 | no | 143.2 | 7.16 | 90.6 | 11.31 | 1.58x | 0.88x |
| 1 | yes | 154.9 | 6.62 | 47.0 | 21.83 | 3.30x | 3.71x |
| 8 | no | 585.7 | 1.75 | 296.7 | 3.45 | 1.97x | 2.08x |
| 8 | yes | 367.9 | 2.79 | 161.3 | 6.36 | 2.28x | 2.36x |

3x met only at batch 1 with CFG; at batch 1 without CFG JAX's two threads against HF's one
(its probe picked 1) give 1.58x wall clock but 0.88x per CPU-second.

Then (same machine and day, `python experiments/bench/decode.py`, load 1.7-2.4, torch on 2
threads) after three changes to the sampler: the KV cache stored [B * H, S, K] so the decode
step's attention reads it as stored (XLA had copied every layer's keys and values each step),
the loop run in cache windows of ~256 steps that attend only the slots they need
(`SamplerSpec.cache_window`; 0 = the old single window), and inverse-CDF sampling (two
uniforms per row, not V Gumbel draws):

| batch | CFG | JAX tok/s | s/image | HF tok/s | s/image | ratio | CPU-s ratio |
|---|---|---|---|---|---|---|---|
| 1 | no | 226.7 | 4.52 | 83.4 | 12.29 | 2.72x | 2.93x |
| 1 | yes | 153.1 | 6.70 | 42.6 | 24.04 | 3.59x | 3.81x |
| 8 | no | 722.2 | 1.42 | 272.6 | 3.76 | 2.65x | 2.85x |
| 8 | yes | 452.5 | 2.27 | 146.0 | 7.02 | 3.10x | 3.37x |

3x met with CFG at both batch sizes, not without (2.7x). Where a step's time goes now
(profiled, batch 1, JAX-only runs 191-251 tok/s): the dots read 133 MB of float32 weights and
~22 MB of cache in 3.7 ms, ~41 GB/s, the machine's measured read bandwidth (44 GB/s): batch 1
is at the float32 bandwidth bound; more needs fewer bytes (bf16 or int8 weights), not less
work. Batch 8: 11 ms per step, 5.4 ms of it the weight GEMMs in XLA's YNNPACK fusions at ~25
GB/s (M = 8 runs slower per byte than the M = 1 matrix-vector path; XLA's Eigen dots, with
`--xla_cpu_experimental_ynn_fusion_type=-individual_dot`, were slower still: 16 ms per step) and
4 ms the attention dots over the windowed cache at ~44 GB/s. Windows of 128 / 64 steps: +3% /
+4% tokens/s at batch 8 for 1.6x / 2.8x the compile time; 256 kept.

Next session (same machine type, `python experiments/bench/decode.py`, load 1.4-2.0), after
the sampler stopped multiplying the whole LM head inside an image (`sampler.step_logits`:
while every row is inside an image only the image codes' rows, half of this vocabulary, an
eighth of the bytes a batch-1 step reads; `--full-head` turns it off). JAX-only A/B runs
before this table, batch 1: 255 / 267 vs 235 / 244 tok/s; batch 8: 767 / 800 vs 726 / 715:

| batch | CFG | JAX tok/s | s/image | HF tok/s | s/image | ratio | CPU-s ratio |
|---|---|---|---|---|---|---|---|
| 1 | no | 229.6 | 4.46 | 85.8 | 11.95 | 2.68x | 3.11x |
| 1 | yes | 194.0 | 5.28 | 41.8 | 24.51 | 4.64x | 2.63x |
| 8 | no | 776.0 | 1.32 | 277.5 | 3.69 | 2.80x | 3.06x |
| 8 | yes | 502.4 | 2.04 | 152.4 | 6.73 | 3.30x | 3.58x |

3x still met only with CFG. Tried and rejected: a bfloat16 KV cache with float32 compute
(XLA's CPU dots convert it back: batch 8 fell from 747 to 411 tok/s).

Measured again on a quiet machine (2026-11-27, next session, same code; `python
experiments/bench/decode.py`, load 1.3-2.0 from the benchmark itself; a JAX-only batch-1 run
just before: 279.7 tok/s):

| batch | CFG | JAX tok/s | s/image | HF tok/s | s/image | ratio | CPU-s ratio |
|---|---|---|---|---|---|---|---|
| 1 | no | 269.9 | 3.80 | 85.4 | 12.01 | 3.16x | 3.42x |
| 1 | yes | 187.0 | 5.48 | 42.2 | 24.29 | 4.43x | 2.37x |
| 8 | no | 780.7 | 1.31 | 286.9 | 3.57 | 2.72x | 3.00x |
| 8 | yes | 505.9 | 2.03 | 153.2 | 6.69 | 3.30x | 3.62x |

The table above's batch-1 row (2.68x) was the machine's load, not the sampler: 3x is met at
batch 1 here and missed at batch 8 without CFG (2.72x; its step is ~10 ms: ~5 ms of M = 8
weight GEMMs at ~25 GB/s, ~4 ms of attention over the windowed cache).

Batch 8 without CFG probed again (2026-11-28, same machine type, quiet; JAX-only runs of this
script, `--batches 8 --no-cfg`, 789.0 tok/s as it is): XLA CPU flags, each for the whole
program: `--xla_cpu_experimental_ynn_fusion_type=` (no YNNPACK fusions) 658.6, the same plus
XNNPACK dots 609.0, `--xla_cpu_prefer_vector_width=512` 752.9, the concurrency-optimised
scheduler 781.9, fast math 797.0 (noise). Stand-alone loops of the step's pieces (8 layers of
the bench shape + the half LM head, 200 steps, median of 5): the weight products at M = 8 take
4.3-4.6 ms (25-27 GB/s of weights; M = 1: 2.6 ms, 45 GB/s), and no other form of the same
product was faster: weights stored transposed 7.0 ms, (W^T x^T)^T 6.6, two M = 4 products 6.1,
eight M = 1 products 9.0, vmap over rows 5.0. Attention over a [64, 673, 64] cache (the
windows' mean length) x 8 layers: 4.3 ms with the batched dots as they are (41 GB/s, this
machine's read bandwidth), 8.5 / 7.8 ms written as multiply + reduce. So the attention is at
the bandwidth bound and the weight products at ~60% of it, limited by XLA's CPU GEMM kernels
at M = 8; 3x without CFG at batch 8 would need fewer bytes (bf16 weights, which changes the
float32 numerics the peer is compared at) or a better M = 8 kernel than XLA provides.

Run again (2026-11-28, same machine type, quiet, `python experiments/bench/decode.py`, 6.5
min) once this script, like the `cm3leon` command, ran with transparent huge pages for both
frameworks (cm3leon_jax/hugepages.py; they made the train step 1.2-1.3x faster, decoding
barely: JAX-only batch 8 without CFG 791 -> 823 tok/s in one A/B pair):

| batch | CFG | JAX tok/s | s/image | HF tok/s | s/image | ratio | CPU-s ratio |
|---|---|---|---|---|---|---|---|
| 1 | no | 270.2 | 3.79 | 84.4 | 12.15 | 3.20x | 1.73x |
| 1 | yes | 189.2 | 5.42 | 42.0 | 24.43 | 4.51x | 4.87x |
| 8 | no | 794.3 | 1.29 | 275.3 | 3.72 | 2.89x | 3.14x |
| 8 | yes | 521.0 | 1.97 | 146.6 | 6.99 | 3.55x | 3.92x |

Batch 8 without CFG still misses 3x (2.89x; JAX 794 tok/s as before, HF a little slower).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

if __name__ == "__main__":
  # The allocator setting the `cm3leon` command runs under (cm3leon_jax/hugepages.py), for
  # both frameworks of the table; CM3LEON_HUGEPAGES=0 measures without it.
  from cm3leon_jax import hugepages
  hugepages.reexec_with_hugepages()

SINGLE_THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
if __name__ == "__main__" and "--jax-single-thread" in sys.argv:
  # XLA reads its flags once, when the backend starts: set them before importing jax.
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {SINGLE_THREAD_FLAGS}".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from cm3leon_jax import configs  # noqa: E402
from cm3leon_jax.configs.base import tokens_per_image  # noqa: E402
from cm3leon_jax.decode import constraints as C  # noqa: E402
from cm3leon_jax.decode import prompts as P  # noqa: E402
from cm3leon_jax.decode.sampler import SamplerSpec, generate, make_knobs, pad_prompts  # noqa: E402
from cm3leon_jax.model.decoder import Decoder, DecoderConfig, param_count  # noqa: E402
from cm3leon_jax.tokenizers.vocab import Vocab  # noqa: E402
from experiments.bench.torch_peer import import_peers  # noqa: E402

TARGET_RATIO = 3.0
TARGET_BOUND_FRACTION = 0.5
# Peak HBM bandwidth in bytes/s by `device_kind` substring (first match wins; lower case).
BANDWIDTH = (
    ("h200", 4.8e12),
    ("h100 nvl", 3.9e12),
    ("h100 pcie", 2.0e12),
    ("h100", 3.35e12),  # SXM, "NVIDIA H100 80GB HBM3"
    ("gh200", 4.0e12),
    ("a100-sxm4-80gb", 2.039e12),
    ("a100 80gb pcie", 1.935e12),
    ("a100", 1.555e12),
    ("l40s", 0.864e12),
    ("l4", 0.3e12),
    ("tpu v5 lite", 0.819e12),
    ("tpu v5e", 0.819e12),
    ("tpu v5p", 2.765e12),
    ("tpu v5", 2.765e12),
    ("tpu v6", 1.64e12),
    ("tpu v4", 1.228e12),
)


@dataclasses.dataclass
class Row:
  batch: int
  guided: bool
  new_tokens: int
  jax_s: float
  jax_cpu_s: float
  jax_compile_s: float
  torch_s: float | None = None
  torch_cpu_s: float | None = None
  torch_threads: int | None = None
  tokens: np.ndarray | None = None  # the last JAX run's output [B, new_tokens]

  @property
  def jax_tok_s(self) -> float:
    return self.batch * self.new_tokens / self.jax_s

  @property
  def torch_tok_s(self) -> float | None:
    return None if self.torch_s is None else self.batch * self.new_tokens / self.torch_s

  @property
  def cpu_ratio(self) -> float | None:
    """Ratio of tokens per CPU-second (both processes' own CPU time, all their threads)."""
    return None if self.torch_cpu_s is None else self.torch_cpu_s / self.jax_cpu_s

  @property
  def ratio(self) -> float | None:
    return None if self.torch_s is None else self.torch_s / self.jax_s


def _seq_len_for(config, prompt_len: int, new_tokens: int) -> list[str]:
  """The override that makes prompt + new tokens fit the model's window (multiple of 64)."""
  need = prompt_len + new_tokens
  if need <= config.model.seq_len:
    return []
  return [f"model.seq_len={64 * math.ceil(need / 64)}"]


def load_config(preset: str, overrides: list[str], prompt_len: int):
  config = configs.load(preset, overrides)
  extra = _seq_len_for(config, prompt_len, tokens_per_image(config) + 1)
  return (configs.load(preset, overrides + extra), extra) if extra else (config, extra)


def make_prompts(vocab: Vocab, batch: int, prompt_len: int, seed: int = 0) -> list[P.Prompt]:
  """`batch` text-to-image prompts of exactly `prompt_len` tokens (random caption ids)."""
  rng = np.random.default_rng(seed)
  return [P.text_to_image(vocab, rng.integers(0, vocab.text_size, prompt_len - 2))
          for _ in range(batch)]


class JaxRunner:
  """One (batch, guided) shape of the compiled sampler: warm-up (compile) once, then runs."""

  def __init__(self, model: Decoder, vocab: Vocab, prompts: list[P.Prompt], guided: bool,
               n_image: int, cfg_weight: float, cache_window: int | None = None,
               image_head: bool = True):
    self.model, self.vocab = model, vocab
    self.streams = [[p.cond for p in prompts]] + ([[p.uncond for p in prompts]] if guided else [])
    self.spec = SamplerSpec(num_streams=len(self.streams), max_new_tokens=n_image + 1,
                            tokens_per_image=n_image, stop_after_image=True,
                            image_head=image_head,
                            **({} if cache_window is None else dict(cache_window=cache_window)))
    self.knobs = make_knobs(len(prompts), temperature=1.0, top_p=1.0, cfg_weight=cfg_weight)
    padded = pad_prompts(self.streams, model.cfg.seq_len, self.spec.max_new_tokens)
    batch = len(prompts)
    stream0 = np.stack([np.roll(r, n) for r, n in zip(padded.ids[:batch], padded.lengths_B)])
    self.state = C.initial_state(vocab, stream0, padded.lengths_B, n_image)
    self.seed = 0

  def compile(self) -> float:
    """Trace + compile + one prefill: every row starts finished, so the loop exits at once."""
    done = self.state._replace(done_B=jnp.ones_like(self.state.done_B))
    start = time.perf_counter()
    generate(self.model, self.vocab, self.streams, self.spec, self.knobs, jax.random.key(0),
             state=done)
    return time.perf_counter() - start

  def run(self) -> tuple[float, np.ndarray]:
    self.seed += 1
    start, cpu = time.perf_counter(), time.process_time()
    out, done = generate(self.model, self.vocab, self.streams, self.spec, self.knobs,
                         jax.random.key(self.seed), state=self.state)
    seconds = time.perf_counter() - start  # generate returns host arrays: the work is done
    cpu = time.process_time() - cpu
    if not done.all():
      raise RuntimeError("the sampler stopped before closing every image")
    return seconds, cpu, out


class TorchRunner:
  """Hugging Face OPTForCausalLM of the same shape, `generate` with its KV cache."""

  def __init__(self, config, vocab: Vocab, prompts: list[P.Prompt], guided: bool,
               new_tokens: int, cfg_weight: float, threads: str, device: str = "cpu"):
    torch, _ = import_peers()
    from transformers import OPTConfig, OPTForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    self.torch = torch
    m = config.model
    opt = OPTConfig(vocab_size=vocab.size, hidden_size=m.d_model, num_hidden_layers=m.num_layers,
                    ffn_dim=m.d_ff, num_attention_heads=m.num_heads,
                    max_position_embeddings=m.seq_len, word_embed_proj_dim=m.d_model,
                    do_layer_norm_before=True, dropout=0.0, attention_dropout=0.0,
                    activation_function="relu", enable_bias=False,
                    layer_norm_elementwise_affine=False, tie_word_embeddings=True,
                    pad_token_id=vocab.pad_id, bos_token_id=vocab.eos_id,
                    eos_token_id=vocab.eos_id)
    torch.manual_seed(0)
    self.device = torch.device(device)
    if self.device.type == "cuda":
      # JAX's default float32 matmul precision on a GPU uses TF32; let torch do the same.
      torch.backends.cuda.matmul.allow_tf32 = True
    self.model = OPTForCausalLM(opt).eval().to(self.device)
    self.ids = torch.tensor(np.stack([p.cond for p in prompts]), dtype=torch.long,
                            device=self.device)
    self.kwargs = dict(attention_mask=torch.ones_like(self.ids), do_sample=True, temperature=1.0,
                       top_p=1.0, top_k=0, use_cache=True, min_new_tokens=new_tokens,
                       max_new_tokens=new_tokens, pad_token_id=vocab.pad_id)
    if guided:
      neg = torch.tensor(np.stack([p.uncond for p in prompts]), dtype=torch.long,
                         device=self.device)
      self.kwargs.update(guidance_scale=cfg_weight, negative_prompt_ids=neg,
                         negative_prompt_attention_mask=torch.ones_like(neg))
    self.new_tokens = new_tokens
    # On a GPU the host threads only launch kernels: no probe.
    self.threads = (self._choose_threads(threads) if self.device.type == "cpu"
                    else torch.get_num_threads())
    torch.set_num_threads(self.threads)

  def _step_time(self, threads: int, steps: int = 8) -> float:
    """Seconds per cached decode step (model only) with `threads` threads."""
    torch = self.torch
    torch.set_num_threads(threads)
    with torch.inference_mode():
      out = self.model(self.ids, use_cache=True)
      token = self.ids[:, -1:]
      out = self.model(token, cache=out.cache, use_cache=True)  # warm
      start = time.perf_counter()
      for _ in range(steps):
        out = self.model(token, cache=out.cache, use_cache=True)
      return (time.perf_counter() - start) / steps

  def _choose_threads(self, threads: str) -> int:
    cores = os.cpu_count() or 1
    if threads != "auto":
      return int(threads)
    if cores == 1:
      return 1
    probes = {n: self._step_time(n) for n in (cores, 1)}
    best = min(probes, key=probes.get)
    print(f"  torch threads probe (batch {self.ids.shape[0]}): "
          + ", ".join(f"{n} thread(s) {1e3 * t:.1f} ms/step" for n, t in probes.items())
          + f" -> {best}", flush=True)
    return best

  def warm_up(self) -> None:
    with self.torch.inference_mode():
      self.model.generate(self.ids, **{**self.kwargs, "min_new_tokens": 4, "max_new_tokens": 4})
    self._sync()

  def _sync(self) -> None:
    if self.device.type == "cuda":
      self.torch.cuda.synchronize()

  def run(self) -> float:
    self.torch.set_num_threads(self.threads)
    with self.torch.inference_mode():
      start, cpu = time.perf_counter(), time.process_time()
      out = self.model.generate(self.ids, **self.kwargs)
      self._sync()
      seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    if out.shape[1] != self.ids.shape[1] + self.new_tokens:
      raise RuntimeError(f"HF generate returned {out.shape[1] - self.ids.shape[1]} new tokens")
    return seconds, cpu


def _torch_available() -> bool:
  try:
    import_peers()
  except ImportError:
    return False
  return True


def bench_row(config, model, vocab, batch, guided, args, use_torch) -> Row:
  n_image = tokens_per_image(config)
  prompts = make_prompts(vocab, batch, args.prompt_len)
  label = f"batch {batch}, {'CFG' if guided else 'no CFG'}"
  print(f"[{label}] compiling ...", flush=True)
  jax_runner = JaxRunner(model, vocab, prompts, guided, n_image, args.cfg_weight,
                         args.cache_window, not args.full_head)
  compile_s = jax_runner.compile()
  torch_runner = None
  if use_torch:
    torch_runner = TorchRunner(config, vocab, prompts, guided, n_image + 1, args.cfg_weight,
                               args.torch_threads, args.torch_device)
    torch_runner.warm_up()
  repeats = args.repeats if batch < 8 else min(args.repeats, args.repeats_large)
  jax_times, jax_cpu, torch_times, torch_cpu, out = [], [], [], [], None
  for r in range(repeats):  # interleaved: load changes hit both sides alike
    seconds, cpu, out = jax_runner.run()
    jax_times.append(seconds)
    jax_cpu.append(cpu)
    line = f"[{label}] repeat {r + 1}/{repeats}: jax {seconds:.2f} s ({cpu:.2f} CPU s)"
    if torch_runner is not None:
      seconds, cpu = torch_runner.run()
      torch_times.append(seconds)
      torch_cpu.append(cpu)
      line += f", torch {seconds:.2f} s ({cpu:.2f} CPU s); load {os.getloadavg()[0]:.1f}"
    print(line, flush=True)
  median = lambda xs: statistics.median(xs) if xs else None
  return Row(batch, guided, n_image + 1, median(jax_times), median(jax_cpu), compile_s,
             median(torch_times), median(torch_cpu),
             torch_runner.threads if torch_runner else None, out)


def _fmt(x, spec: str) -> str:
  return "-" if x is None else format(x, spec)


def print_table(rows: list[Row]) -> None:
  head = (f"{'batch':>5} {'CFG':>4} {'new tok':>7} | {'JAX tok/s':>9} {'s/image':>8} "
          f"{'compile s':>9} | {'HF tok/s':>8} {'s/image':>8} {'threads':>7} | "
          f"{'ratio':>6} {'target':>7} | {'CPU-s ratio':>11}")
  print(head)
  print("-" * len(head))
  for r in rows:
    met = None if r.ratio is None else ("met" if r.ratio >= TARGET_RATIO else "NOT met")
    hf_img = None if r.torch_s is None else r.torch_s / r.batch
    print(f"{r.batch:>5} {'yes' if r.guided else 'no':>4} {r.new_tokens:>7} | "
          f"{r.jax_tok_s:>9.1f} {r.jax_s / r.batch:>8.2f} {r.jax_compile_s:>9.1f} | "
          f"{_fmt(r.torch_tok_s, '>8.1f')} {_fmt(hf_img, '>8.2f')} "
          f"{_fmt(r.torch_threads, '>7d')} | {_fmt(r.ratio, '>5.2f')}x {_fmt(met, '>7')} | "
          f"{_fmt(r.cpu_ratio, '>10.2f')}x")


def bandwidth_of(device_kind: str) -> float | None:
  kind = device_kind.lower()
  return next((bw for name, bw in BANDWIDTH if name in kind), None)


def bandwidth_check(preset: str, overrides: list[str], args) -> dict:
  """ms per token at batch 1 (no CFG) vs the memory-bandwidth bound."""
  config, extra = load_config(preset, ["model.param_dtype=bfloat16", "model.dtype=bfloat16"]
                              + overrides, args.prompt_len)
  vocab = Vocab.from_config(config)
  model = Decoder(DecoderConfig.from_config(config), rngs=nnx.Rngs(0))
  n_image = tokens_per_image(config)
  runner = JaxRunner(model, vocab, make_prompts(vocab, 1, args.prompt_len), False, n_image,
                     args.cfg_weight, args.cache_window, not args.full_head)
  compile_s = runner.compile()
  seconds = statistics.median(runner.run()[0] for _ in range(args.repeats))
  new = n_image + 1
  cfg = model.cfg
  item = jnp.dtype(cfg.param_dtype).itemsize
  # Per token: every layer weight and the LM head (the tied embedding table) once; the token
  # and position embeddings are one row each (ignored).
  # (param_count(embeddings=False) holds an untied head; a tied one is the embedding table.)
  head = cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0
  weight_bytes = (param_count(cfg, embeddings=False) + head) * item
  # KV cache: the slots written so far (mean over the image), keys and values, all layers.
  slot_bytes = 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
  cache_bytes = (args.prompt_len + new / 2) * slot_bytes
  device = jax.devices()[0]
  bw = bandwidth_of(device.device_kind)
  ms = 1e3 * seconds / new
  bound_ms = None if bw is None else 1e3 * (weight_bytes + cache_bytes) / bw
  result = dict(preset=preset, extra=extra, device=device.device_kind, compile_s=compile_s,
                ms_per_token=ms, weight_mb=weight_bytes / 1e6, cache_mb=cache_bytes / 1e6,
                bandwidth=bw, bound_ms=bound_ms,
                fraction=None if bound_ms is None else bound_ms / ms)
  print(f"\nBandwidth check: {preset} ({', '.join(extra) or 'no overrides'}; bf16 weights and "
        f"cache), batch 1, {args.prompt_len}-token prompt + {new} new tokens, "
        f"device {device.device_kind}")
  print(f"  weights read per token {result['weight_mb']:.1f} MB, mean KV cache read "
        f"{result['cache_mb']:.1f} MB; compile {compile_s:.1f} s")
  if bound_ms is None:
    print(f"  {ms:.3f} ms/token; bandwidth of '{device.device_kind}' unknown: no bound")
  else:
    frac = result["fraction"]
    print(f"  {ms:.3f} ms/token vs bound {bound_ms:.3f} ms/token at {bw / 1e12:.2f} TB/s: "
          f"{100 * frac:.0f}% of the bound (target >= {100 * TARGET_BOUND_FRACTION:.0f}%: "
          f"{'met' if frac >= TARGET_BOUND_FRACTION else 'NOT met'})")
  return result


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="bench", help="preset for the main table")
  parser.add_argument("--override", action="append", default=[],
                      help="config override a.b=value (repeatable)")
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--prompt-len", type=int, default=32)
  parser.add_argument("--cfg-weight", type=float, default=3.0)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--cache-window", type=int, default=None,
                      help="SamplerSpec.cache_window (new tokens per cache window; 0: one window)")
  parser.add_argument("--repeats-large", type=int, default=2,
                      help="repeats at batch >= 8 (minutes per run on a 2-core CPU)")
  parser.add_argument("--full-head", action="store_true",
                      help="SamplerSpec.image_head=False: the whole LM head inside images too")
  parser.add_argument("--no-cfg", action="store_true", help="only the rows without guidance")
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--torch-threads", default="auto", help="'auto' or a number")
  parser.add_argument("--torch-device", default="auto",
                      help="'auto' (CUDA when JAX runs on a GPU and torch sees one), 'cpu', 'cuda'")
  parser.add_argument("--jax-single-thread", action="store_true",
                      help="run XLA's CPU backend on one thread (only when run as a script)")
  parser.add_argument("--bandwidth", action="store_true",
                      help="run the bandwidth check even off GPU")
  parser.add_argument("--bandwidth-config", default="cm3leon_350m")
  parser.add_argument("--bandwidth-override", action="append", default=[])
  return parser.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  config, extra = load_config(args.config, list(args.override), args.prompt_len)
  vocab = Vocab.from_config(config)
  use_torch = not args.no_torch and _torch_available()
  if use_torch and args.torch_device == "auto":
    import torch
    args.torch_device = ("cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available()
                         else "cpu")
  m = config.model
  load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
  xla_threads = ("1 thread" if SINGLE_THREAD_FLAGS in os.environ.get("XLA_FLAGS", "")
                 else "default threads")
  print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, load average {load}; "
        f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}, "
        f"XLA CPU {xla_threads})")
  if args.jax_single_thread and xla_threads != "1 thread":
    print("note: --jax-single-thread ignored: jax was imported before the flag could be set")
  if use_torch:
    torch, transformers = import_peers()
    print(f"peer: torch {torch.__version__}, transformers {transformers.__version__}, "
          f"OPTForCausalLM.generate on {args.torch_device} (threads: {args.torch_threads})")
  elif not args.no_torch:
    print("peer: torch/transformers not importable (pip install -r requirements-bench.txt)")
  print(f"model: {args.config} ({', '.join(extra + list(args.override)) or 'no overrides'}): "
        f"d={m.d_model}, {m.num_layers} layers, {m.num_heads} heads, ffn {m.d_ff}, vocab "
        f"{vocab.size}, {m.dtype}; prompt {args.prompt_len} tokens + "
        f"{tokens_per_image(config)} image tokens + <break>; sampling T=1, top-p 1; "
        f"CFG weight {args.cfg_weight}")
  model = Decoder(DecoderConfig.from_config(config), rngs=nnx.Rngs(0))
  rows = []
  for batch in args.batches:
    for guided in ((False,) if args.no_cfg else (False, True)):
      rows.append(bench_row(config, model, vocab, batch, guided, args, use_torch))
  print()
  print_table(rows)
  if use_torch:
    print(f"ratio = JAX tokens/s / HF tokens/s (wall clock; target >= {TARGET_RATIO:.0f}x at "
          "every batch size). CPU-s ratio = the same per CPU-second each process used (all "
          "its threads): the work each side does, less sensitive to other jobs on the machine.")
  result = {"rows": rows, "vocab": vocab, "tokens_per_image": tokens_per_image(config)}
  if jax.default_backend() in ("gpu", "tpu") or args.bandwidth:
    result["bandwidth"] = bandwidth_check(args.bandwidth_config, list(args.bandwidth_override),
                                          args)
  return result


if __name__ == "__main__":
  main()
