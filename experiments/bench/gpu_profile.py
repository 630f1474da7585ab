"""Where the time goes: a profiler trace of the train step and of the decode loop, summarised.

    python experiments/bench/gpu_profile.py                      # 350M presets on a GPU
    python experiments/bench/gpu_profile.py --train-config tiny --decode-config tiny  # anywhere

Runs `jax.profiler.trace` (perfetto JSON) around a few train steps of `--train-config`
(batch `--batch`, synthetic data, the trainer's real step) and around one decode of an image
per prompt (`--decode-batch` prompts, default 1) with `--decode-config` (the sampler's real
compiled loop), then prints, per part, the device time by kernel class (matmul, attention,
fused elementwise/reductions, copies, ...), the top kernels with the HLO op they belong to,
and for decoding the kernels launched and the device-busy fraction per generated token (a busy
fraction well below 1 means the loop waits on launches and host syncs, not on memory). Off GPU
the trace holds host threads only; the same summary then shows the CPU executor's ops, which
is how the tests check the parsing.
The raw traces stay in `--trace-dir` (open them in https://ui.perfetto.dev).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import jax  # noqa: E402
import numpy as np  # noqa: E402

# Kernel classes by name fragment (first match wins; lower case).
CLASSES = (
    ("attention", ("cudnn", "fmha", "flash", "sdpa", "attention")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "gemv", "cublas", "dot", "triton_gemm",
                "matmul")),
    ("copy/transpose", ("memcpy", "memset", "copy", "transpose", "dynamic_update_slice")),
    ("reduction", ("reduce", "softmax", "argmax", "sort", "scatter", "gather")),
    ("fused elementwise", ("fusion", "loop_", "input_", "convert", "add", "multiply")),
)


def kernel_class(name: str) -> str:
  low = name.lower()
  return next((c for c, keys in CLASSES if any(k in low for k in keys)), "other")


def load_trace(trace_dir: str) -> list[dict]:
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                           recursive=True))
  if not paths:
    raise FileNotFoundError(f"{trace_dir}: no perfetto_trace.json.gz (did the profiler run?)")
  with gzip.open(paths[-1]) as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def device_events(events: list[dict]) -> tuple[list[dict], bool]:
  """Complete events ('X') of the device's kernel streams; the host's when there is no device.

  A GPU timeline holds one thread per CUDA stream ("Stream #..."), and may add summary lines
  (XLA modules / ops) that cover the same time: only the stream threads are counted.
  """
  procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e.get("tid")): e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  device = {p for p, n in procs.items() if "/device:" in n}
  xs = [e for e in events if e.get("ph") == "X" and e.get("pid") in (device or set(procs))]
  if device:
    busy = collections.Counter()
    for e in xs:
      busy[(procs[e["pid"]], threads.get((e["pid"], e.get("tid")), "?"))] += e.get("dur", 0.0)
    for (proc, thread), us in busy.most_common():
      print(f"  timeline {proc} / {thread}: {us * 1e-6:.4f} s")
    streams = [e for e in xs if "stream" in threads.get((e["pid"], e.get("tid")), "").lower()]
    xs = streams or xs
  return xs, bool(device)


def summarise(events: list[dict], wall_s: float, units: int, unit: str, top: int = 25) -> dict:
  """Device time per kernel class and per kernel over `units` steps or tokens."""
  xs, on_device = device_events(events)
  by_class, by_kernel, count = collections.Counter(), collections.Counter(), collections.Counter()
  hlo = {}
  for e in xs:
    dur = float(e.get("dur", 0.0)) * 1e-6  # trace microseconds -> s
    name = e.get("name", "?")
    by_class[kernel_class(name)] += dur
    by_kernel[name] += dur
    count[name] += 1
    args = e.get("args", {})
    hlo.setdefault(name, args.get("hlo_op") or args.get("long_name") or "")
  busy = sum(by_class.values())
  print(f"  {'device' if on_device else 'host (no device timeline)'} events: {len(xs)}; "
        f"busy {busy:.4f} s over {wall_s:.4f} s wall ({100 * busy / max(wall_s, 1e-9):.0f}%), "
        f"{units} {unit}s: {len(xs) / max(units, 1):.0f} kernels and "
        f"{1e3 * busy / max(units, 1):.3f} ms busy per {unit}")
  print(f"\n  | class | s per {unit} | share |\n  |---|---|---|")
  for c, s in by_class.most_common():
    print(f"  | {c} | {s / max(units, 1):.5f} | {100 * s / max(busy, 1e-12):.1f}% |")
  print(f"\n  | kernel | class | calls per {unit} | ms per {unit} | share | HLO op |\n"
        "  |---|---|---|---|---|---|")
  for name, s in by_kernel.most_common(top):
    print(f"  | {name[:70]} | {kernel_class(name)} | {count[name] / max(units, 1):.1f} | "
          f"{1e3 * s / max(units, 1):.3f} | {100 * s / max(busy, 1e-12):.1f}% | "
          f"{str(hlo[name])[:60]} |")
  return dict(busy_s=busy, wall_s=wall_s, kernels=len(xs), units=units,
              by_class={c: s for c, s in by_class.items()})


def profile_train(config_name: str, batch: int, overrides: list[str], steps: int,
                  trace_dir: str) -> dict:
  from cm3leon_jax import configs
  from experiments.bench.train_step import jax_runner
  config = configs.load(config_name, ["mesh.data=1", "mesh.fsdp=-1",
                                      f"train.batch_size={batch}", *overrides])
  run = jax_runner(config)
  run(2)  # compile + warm
  start = time.perf_counter()
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    times, _ = run(steps)
  wall = time.perf_counter() - start
  print(f"\nTrain step: {config_name} batch {batch} ({', '.join(overrides) or 'preset'}), "
        f"{steps} steps, median {np.median(times):.4f} s/step (profiled)")
  return summarise(load_trace(trace_dir), float(np.sum(times)), steps, "step")


def profile_decode(config_name: str, overrides: list[str], prompt_len: int,
                   trace_dir: str, batch: int = 1) -> dict:
  from experiments.bench import decode as D
  args = D.parse_args(["--prompt-len", str(prompt_len)])
  config, _ = D.load_config(config_name, list(overrides), prompt_len)
  vocab = D.Vocab.from_config(config)
  model = D.Decoder(D.DecoderConfig.from_config(config), rngs=D.nnx.Rngs(0))
  n_image = D.tokens_per_image(config)
  runner = D.JaxRunner(model, vocab, D.make_prompts(vocab, batch, prompt_len), False, n_image,
                       args.cfg_weight)
  runner.compile()
  runner.run()  # warm
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    seconds, _, _ = runner.run()
  print(f"\nDecode: {config_name} ({', '.join(overrides) or 'preset'}), batch {batch}, no CFG, "
        f"{prompt_len}-token prompt + {n_image + 1} tokens: {1e3 * seconds / (n_image + 1):.3f} "
        "ms/token (profiled)")
  return summarise(load_trace(trace_dir), seconds, n_image + 1, "token")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--train-config", default="cm3leon_350m")
  p.add_argument("--train-override", nargs="*", default=[])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--decode-config", default="cm3leon_350m")
  p.add_argument("--decode-override", nargs="*",
                 default=["model.param_dtype=bfloat16", "model.dtype=bfloat16"])
  p.add_argument("--prompt-len", type=int, default=32)
  p.add_argument("--decode-batch", type=int, default=1, help="prompts per decode call")
  p.add_argument("--parts", default="train,decode")
  p.add_argument("--trace-dir", default="/tmp/gpu_profile")
  args = p.parse_args(argv)
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}")
  out = {}
  if "train" in args.parts:
    out["train"] = profile_train(args.train_config, args.batch, args.train_override, args.steps,
                                 os.path.join(args.trace_dir, "train"))
  if "decode" in args.parts:
    out["decode"] = profile_decode(args.decode_config, args.decode_override, args.prompt_len,
                                   os.path.join(args.trace_dir, "decode"), args.decode_batch)
  return out


if __name__ == "__main__":
  main()
