"""cm3leon_350m: CM3Leon-350M as in the paper (REFERENCE.md section 4): 24 layers,
d_model 1024, 16 heads of 64, sequence 4096, 8M-token batches (2048 sequences), peak LR
6e-4, warmup 1500, 1.4T tokens (166,893 steps). Paper hardware: 256 A100.

    python -m cm3leon_jax train --config cm3leon_350m --config.data.data_dir=gs://...   # on a TPU pod

Not runnable on a CPU; `python tpu/compile_check.py --config cm3leon_350m` compiles its train step
for real TPU topologies and prints per-device memory.

Its 24 layers are unrolled (`model.scan_layers=False`): on one H200 the train step runs at
51.8% MFU unrolled against 41.7-42.5% scanned (experiments/bench/train_step.py; XLA overlaps
kernels of neighbouring layers on several streams only outside a loop). The cost: the step
compiles in 77 s instead of 18 s for a v5e:4x4 slice and takes 6.11 instead of 5.68 GiB per
chip there (tpu/compile_check.py). `--config.model.scan_layers=true` scans them.
"""

from cm3leon_jax.configs.base import base_config

TOKENS_PER_BATCH = 2048 * 4096


def get_config(arg=None):
  del arg
  c = base_config()
  c.name = "cm3leon_350m"
  c.vocab.text_size = 56320
  c.vq.image_size = 256
  c.vq.downsample = 8
  c.vq.codebook_size = 8192
  c.model.num_layers = 24
  c.model.d_model = 1024
  c.model.num_heads = 16
  c.model.head_dim = 64
  c.model.d_ff = 4096
  c.model.seq_len = 4096
  c.model.dtype = "bfloat16"
  c.model.scan_layers = False  # see the docstring
  c.optimizer.peak_lr = 6e-4
  c.optimizer.warmup_steps = 1500
  c.train.batch_size = 2048
  c.train.steps = round(1.4e12 / TOKENS_PER_BATCH)
  c.workdir = "outputs/cm3leon_350m"
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  return c
