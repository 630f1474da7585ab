"""Import the benchmark peers (torch + transformers) on a machine with a CPU-only torch.

PyPI's torchvision wheel (pinned in requirements-bench.txt for tests/test_inception.py) is a
CUDA build: beside the CPU torch its C++ ops fail to register and `import torchvision` raises
RuntimeError. transformers imports torchvision whenever it is installed, so `import
transformers` would fail too. The text models benchmarked here need no torchvision: when it
cannot be imported, it is hidden (`sys.modules['torchvision'] = None`) before transformers is.
"""

from __future__ import annotations

import sys


def import_peers():
  """(torch, transformers), or ImportError when either is not installed."""
  import torch
  try:
    import torchvision  # noqa: F401
  except ImportError:
    pass
  except Exception:  # noqa: BLE001 -- the broken-ops RuntimeError described above
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
      del sys.modules[name]
    sys.modules["torchvision"] = None  # later imports raise ImportError: "not installed"
  import transformers
  return torch, transformers
