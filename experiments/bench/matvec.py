"""Batch-1 decode projections: XLA's dots against the fused Pallas kernels of model/matvec.py.

    python experiments/bench/matvec.py                 # on a GPU: kernels, then the 350M decode
    python experiments/bench/matvec.py --parts kernels --interpret   # anywhere (no timings that
                                                                     # mean anything: checks only)

Part `kernels`: the five products of one `cm3leon_350m` decode step at batch 1 (bf16), each as
the decoder computes it with XLA (LayerNorm + einsum + activation + residual, fused by XLA as
it likes), the same with the row padded to 2 (XLA:GPU strength-reduces a dot with a vector
operand into multiply + reduce; a 2-row matrix may take the GEMM path), and `fused_matvec`.
Each timing is one jitted call of 24 independent products over 24 different weights (more bytes
than the 60 MB L2), median of `--repeats`, divided by 24. On the H200 that was bound by the
call's dispatch and launches (16-28 us per product, against 2.5-5 us per kernel inside the
decode loop's profile), so these rows compare variants only roughly; the decode part below is
the measure. GB/s = weight bytes / that time. Also the largest difference between each
variant and the XLA one.

Part `decode`: decode.py's bandwidth check (ms per token of the 350M preset at batch 1 against
the memory-bandwidth bound) with XLA's dots (`xla`), the fused projections (`pallas`) and the
fused projections plus the Pallas decode-attention kernel (`pallas+attention`,
`model.decode_attention=pallas`), and the largest logit difference of each against `xla` over
a prefill and 8 decode steps of the bench preset in bf16.
`--tilings` adds pallas rows with other kernel tilings (the decode loop is where the kernels'
own speed shows: outside it the products above are bound by dispatch and launches).

Measured on one H200 (2026-12-04, experiments/results/gpu-h200-2026-12-04/1-matvec.log):
every product 16-28 us outside a loop (fused 15.5-22.4, XLA 19.4-25.1, XLA on 2 padded rows
20.6-27.7); fused == XLA for the bf16 products; the 350M decode 1.304 ms/token with XLA's dots,
0.693 with the fused kernels (1.88x; 13% -> 24% of the bound).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cm3leon_jax.model import matvec as MV  # noqa: E402

# (name, D, N, norm, activation, residual, out dtype) of the 350M decode step's products.
SHAPES_350M = (
    ("ln + qkv", 1024, 3072, True, None, False, None),
    ("out proj + residual", 1024, 1024, False, None, True, None),
    ("ln + mlp in + relu", 1024, 4096, True, "relu", False, None),
    ("mlp out + residual", 4096, 1024, False, None, True, None),
    ("ln + image head (f32)", 1024, 8192, True, None, False, "float32"),
)
LAYERS = 24
DEFAULT_TILING = (MV.TARGET_PROGRAMS, MV.NUM_WARPS, MV.CHUNK_ELEMENTS)


def _xla(x_RD, w_ND, r_RN, norm, activation, out_dtype, pad_rows=0):
  if pad_rows:
    x_RD = jnp.pad(x_RD, ((0, pad_rows), (0, 0)))
    r_RN = None if r_RN is None else jnp.pad(r_RN, ((0, pad_rows), (0, 0)))
  y = MV.reference(x_RD, w_ND, r_RN, norm=norm, activation=activation, out_dtype=out_dtype)
  return y[:1] if pad_rows else y


def time_products(fn, xs, ws, rs, repeats: int) -> float:
  """Seconds per product: one jitted call of LAYERS products, median over `repeats`."""
  @jax.jit
  def many(xs, ws, rs):
    return [fn(xs[i], ws[i], None if rs is None else rs[i]) for i in range(LAYERS)]
  jax.block_until_ready(many(xs, ws, rs))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(many(xs, ws, rs))
    times.append(time.perf_counter() - start)
  return statistics.median(times) / LAYERS


def kernels(args) -> list[dict]:
  rows = []
  print(f"\nBatch-1 products of one cm3leon_350m decode step (bf16), {LAYERS} per call, "
        f"median of {args.repeats}; device {jax.devices()[0].device_kind}")
  print(f"{'product':<24} {'D':>5} {'N':>5} | {'XLA us':>8} {'GB/s':>6} | {'XLA 2-row us':>12} "
        f"{'GB/s':>6} | {'fused us':>8} {'GB/s':>6} | {'max |fused - XLA|':>17}")
  key = jax.random.key(0)
  for name, d, n, norm, act, res, od in SHAPES_350M:
    k1, k2, k3, key = jax.random.split(key, 4)
    xs = [x for x in (jax.random.normal(k1, (LAYERS, 1, d)) * 2 + 0.5).astype(jnp.bfloat16)]
    ws = [w for w in (jax.random.normal(k2, (LAYERS, n, d)) * d ** -0.5).astype(jnp.bfloat16)]
    rs = ([r for r in jax.random.normal(k3, (LAYERS, 1, n)).astype(jnp.bfloat16)]
          if res else None)
    variants = {
        "xla": lambda x, w, r: _xla(x, w, r, norm, act, od),
        "pad2": lambda x, w, r: _xla(x, w, r, norm, act, od, pad_rows=1),
        "fused": lambda x, w, r: MV.fused_matvec(x, w, r, norm=norm, activation=act,
                                                 out_dtype=od, interpret=args.interpret),
    }
    row = dict(product=name, d=d, n=n)
    outs = {}
    for v, fn in variants.items():
      try:
        row[v] = time_products(fn, xs, ws, rs, args.repeats)
        outs[v] = np.asarray(jax.jit(fn)(xs[0], ws[0], None if rs is None else rs[0]),
                             np.float32)
      except Exception as e:  # one failing variant still leaves the others' numbers
        print(f"  {name}: {v} failed: {type(e).__name__}: {str(e)[:400]}")
        row[v] = None
    gbs = lambda s: n * d * 2 / s / 1e9
    fmt = lambda s: (f"{1e6 * s:8.1f} {gbs(s):6.0f}" if s else f"{'-':>8} {'-':>6}")
    fmt2 = lambda s: (f"{1e6 * s:12.1f} {gbs(s):6.0f}" if s else f"{'-':>12} {'-':>6}")
    diff = (float(np.abs(outs["fused"] - outs["xla"]).max())
            if "fused" in outs and "xla" in outs else float("nan"))
    row["max_diff"] = diff
    print(f"{name:<24} {d:>5} {n:>5} | {fmt(row['xla'])} | {fmt2(row['pad2'])} | "
          f"{fmt(row['fused'])} | {diff:17.4g}")
    rows.append(row)
  return rows


# --modes: decode-kernel settings of the decode part.
MODES = {
    "xla": dict(decode_matvec="xla"),
    "pallas": dict(decode_matvec="pallas"),
    "pallas+attention": dict(decode_matvec="pallas", decode_attention="pallas"),
}


def logit_check(preset: str = "bench", steps: int = 8, modes=tuple(MODES)) -> dict:
  """Largest |logit| difference of each mode against xla, `preset` in bf16, over a 32-token
  prefill and `steps` decode steps (a cache of 64 slots: the attention kernel tiles it)."""
  from flax import nnx
  from cm3leon_jax import configs
  from cm3leon_jax.decode import cache as KC
  from cm3leon_jax.model.decoder import Decoder, DecoderConfig
  slots = 64
  config = configs.load(preset)
  if config.model.seq_len < 32 + steps:  # room for the prompt and the steps
    config = configs.load(preset, [f"model.seq_len={32 + steps}"])
  cfg = dataclasses.replace(DecoderConfig.from_config(config), dtype="bfloat16",
                            param_dtype="bfloat16")
  out = {}
  ids = jax.random.randint(jax.random.key(1), (1, 32 + steps), 0, cfg.vocab_size)
  for mode in dict.fromkeys(("xla", *modes)):
    model = Decoder(dataclasses.replace(cfg, **MODES[mode]), rngs=nnx.Rngs(0))
    # Zero-initialised residual closers would hide the projections: fill every weight.
    state = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    nnx.update(model, jax.tree.unflatten(tree, [
        (jax.random.normal(k, a.shape, jnp.float32) * 0.02).astype(a.dtype)
        for a, k in zip(leaves, keys)]))

    @jax.jit
    def run(ids):
      cache = KC.init_cache(model, 1, slots)
      layers = KC.layer_params(model)
      pos = jnp.arange(32 + steps)[None]
      seg = jnp.ones_like(ids)
      logits, cache = KC.forward_cached(model, cache, ids[:, :32], pos[:, :32], seg[:, :32],
                                        jnp.int32(0), layers)
      res = [logits[:, -1]]
      for t in range(steps):
        logits, cache = KC.forward_cached(model, cache, ids[:, 32 + t:33 + t],
                                          pos[:, 32 + t:33 + t], seg[:, :1],
                                          jnp.int32(32 + t), layers)
        res.append(logits[:, 0])
      return jnp.stack(res)
    out[mode] = np.asarray(run(ids), np.float32)
  diffs = {m: float(np.abs(out["xla"] - out[m]).max()) for m in out if m != "xla"}
  for m, diff in diffs.items():
    print(f"\n{preset} preset, bf16, prefill 32 + {steps} decode steps: max |logit xla - logit "
          f"{m}| = {diff:.4g} (logits up to {float(np.abs(out['xla']).max()):.3g})")
  return diffs


def decode(args) -> dict:
  from experiments.bench import decode as D
  out = {}
  try:
    out["logit_diff"] = logit_check(args.check_config, modes=args.modes)
  except Exception as e:
    print(f"logit check failed: {type(e).__name__}: {str(e)[:600]}")
  dargs = D.parse_args(["--repeats", str(args.decode_repeats)])
  for tiling in args.tilings:  # the fused kernels' tiling, read when they are traced
    programs, warps, chunk = (int(v) for v in tiling.split(":"))
    MV.TARGET_PROGRAMS, MV.NUM_WARPS, MV.CHUNK_ELEMENTS = programs, warps, chunk
    jax.clear_caches()
    print(f"\n== model.decode_matvec=pallas, tiling {tiling} (target programs : warps : "
          "chunk elements)")
    try:
      out[f"pallas {tiling}"] = D.bandwidth_check(
          args.config, ["model.decode_matvec=pallas"], dargs)
    except Exception as e:
      print(f"  failed: {type(e).__name__}: {str(e)[:600]}")
  MV.TARGET_PROGRAMS, MV.NUM_WARPS, MV.CHUNK_ELEMENTS = DEFAULT_TILING
  jax.clear_caches()
  for mode in args.modes:
    overrides = [f"model.{k}={v}" for k, v in MODES[mode].items()]
    print(f"\n== {mode}: {' '.join(overrides)}")
    try:
      out[mode] = D.bandwidth_check(args.config, overrides, dargs)
    except Exception as e:
      print(f"bandwidth check with decode_matvec={mode} failed: {type(e).__name__}: "
            f"{str(e)[:600]}")
  for mode in args.modes:
    if mode != "xla" and "xla" in out and mode in out:
      print(f"\n{mode} vs xla: {out['xla']['ms_per_token']:.3f} -> "
            f"{out[mode]['ms_per_token']:.3f} ms/token "
            f"({out['xla']['ms_per_token'] / out[mode]['ms_per_token']:.2f}x)")
  return out


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--parts", default="kernels,decode")
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--decode-repeats", type=int, default=2)
  p.add_argument("--config", default="cm3leon_350m", help="preset of the decode part")
  p.add_argument("--check-config", default="bench", help="preset of the logit check")
  p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
  p.add_argument("--tilings", nargs="*", default=[],
                 help="extra pallas rows of the decode part, each TARGET_PROGRAMS:NUM_WARPS:"
                      "CHUNK_ELEMENTS of model/matvec.py (e.g. 512:4:512 256:8:1024)")
  p.add_argument("--interpret", action="store_true",
                 help="run the fused kernel in Pallas' interpreter (off GPU: checks only)")
  args = p.parse_args(argv)
  print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind})")
  out = {}
  if "kernels" in args.parts:
    out["kernels"] = kernels(args)
  if "decode" in args.parts:
    out["decode"] = decode(args)
  return out


if __name__ == "__main__":
  main()
