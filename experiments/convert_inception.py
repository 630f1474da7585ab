"""Convert Inception-v3 PyTorch weights into the .npz that `--config.eval.inception_weights` reads.

    python -m experiments.convert_inception pt_inception-2015-12-05-6726825d.pth inception_fid.npz
    cm3leon eval --config quickstart --suite quickstart \\
        --config.eval.fid_features=inception --config.eval.inception_weights=inception_fid.npz

The input is a PyTorch state dict of Inception-v3: pytorch-fid's FID weights file (the one
published FIDs use; you bring it, nothing is downloaded here) or any torchvision `inception_v3`
state dict (`torch.save(model.state_dict(), path)`; torchvision's ImageNet weights give features
of torchvision's network, not FID's). The conv and BatchNorm tensors that pool3 features need are
kept under their PyTorch names; `fc.*`, `AuxLogits.*` and `*.num_batches_tracked` are dropped;
anything else missing, unexpected or misshapen is one error naming the file and the key
(cm3leon_jax/eval/inception.py). Needs torch (requirements-bench.txt), imported only here.
Cost: a few seconds (a ~95 MB file).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from cm3leon_jax.errors import InputError
from cm3leon_jax.eval import inception

DROPPED_PREFIXES = ("fc.", "AuxLogits.")  # the classifier heads: pool3 comes before them


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A torch.save'd state dict (or a checkpoint holding one under "state_dict") -> numpy arrays."""
  import torch  # benchmark-only dependency

  try:
    # weights_only: tensors and plain containers only, no arbitrary pickled code.
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except FileNotFoundError:
    raise InputError(f"{path}: no such file") from None
  except Exception as e:  # torch raises many kinds for a file that is not a checkpoint
    raise InputError(f"{path}: not a PyTorch state dict that torch.load can read "
                     f"({type(e).__name__}: {e})") from None
  if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise InputError(f"{path}: holds a {type(obj).__name__}, not a state dict (name -> tensor)")
  return {k: v.detach().cpu().numpy() for k, v in obj.items() if torch.is_tensor(v)}


def select(state: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
  """(the tensors pool3 needs, the names dropped)."""
  dropped = [k for k in state
             if k.startswith(DROPPED_PREFIXES) or k.endswith(".num_batches_tracked")]
  return {k: v for k, v in state.items() if k not in set(dropped)}, dropped


def convert(src: str, dst: str) -> dict:
  """Read `src`, keep and check the pool3 tensors, write `dst`. Returns a summary."""
  kept, dropped = select(read_state_dict(src))
  inception.check_state_dict(kept, src)  # errors name the user's file, not the output
  inception.save_npz(kept, dst)
  return {"tensors": len(kept), "values": int(sum(v.size for v in kept.values())),
          "dropped": dropped}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("src", help="PyTorch state dict (.pth) of Inception-v3")
  parser.add_argument("dst", help="the .npz to write")
  args = parser.parse_args(argv)
  try:
    summary = convert(args.src, args.dst)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  dropped = summary["dropped"]
  heads = sorted({k.split(".")[0] for k in dropped if not k.endswith("num_batches_tracked")})
  counters = sum(k.endswith("num_batches_tracked") for k in dropped)
  dropped = heads + ([f"{counters} num_batches_tracked"] if counters else [])
  print(f"wrote {args.dst}: {summary['tensors']} tensors ({summary['values'] / 1e6:.1f}M values) "
        f"from {args.src}; dropped {', '.join(dropped) or 'nothing'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
