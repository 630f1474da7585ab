"""bench: the train-step benchmark shape (issue 7): d=512, 8 layers, 8 heads, seq 1024,
batch 4, vocab 16k (8,064 text ids + 8,192 image codes + 21 specials -> 16,384).

    python experiments/bench/train_step.py --config bench

Compares tokens/s and MFU against Hugging Face OPTForCausalLM of the same shape.
"""

from cm3leon_jax.configs.base import base_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.name = "bench"
  c.vocab.text_size = 8064
  c.vq.codebook_size = 8192
  c.model.num_layers = 8
  c.model.d_model = 512
  c.model.num_heads = 8
  c.model.head_dim = 64
  c.model.d_ff = 2048
  c.model.seq_len = 1024
  c.model.dtype = "float32"
  c.model.remat_policy = "none"
  # Layers unrolled, not scanned: 8 layers compile in seconds either way, and unrolled XLA keeps
  # both CPU threads busier (2-core AMD EPYC, 2026-11-29, experiments/bench/
  # train_step.py --other-layers, one run: 6.093 s per step unrolled, 7.077 s scanned, PyTorch
  # OPT 6.097 s; the threads idled ~21% of the scanned step). The paper presets keep scanning.
  c.model.scan_layers = False
  c.train.batch_size = 4
  c.train.steps = 20
  c.workdir = "outputs/bench"
  return c
