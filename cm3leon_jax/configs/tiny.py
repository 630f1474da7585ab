"""tiny: the test preset. Seconds per stage on one CPU core; results mean nothing.

    python -m cm3leon_jax <command> --config tiny

16 px Shapes, 4x4 image grids from a 64-code VQ, a 2-layer d=64 decoder over 128 tokens.
"""

from cm3leon_jax.configs.base import base_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.name = "tiny"
  c.vocab.text_size = 384
  c.vq.image_size = 16
  c.vq.downsample = 4
  c.vq.codebook_size = 64
  c.vq.code_dim = 16
  c.vq.base_channels = 16
  c.vq.channel_mult = (1, 2, 2)
  c.vq.num_res_blocks = 1
  c.vq.gan_weight = 0.0
  c.vq.learning_rate = 1e-3
  c.vq.batch_size = 16
  c.vq.steps = 50
  c.data.num_train = 256
  c.data.num_eval = 64
  c.data.num_heldout = 64
  c.data.num_workers = 0
  c.retrieval.embed_dim = 32
  c.retrieval.text_layers = 1
  c.retrieval.text_width = 32
  c.retrieval.text_heads = 2
  c.retrieval.text_max_len = 32
  c.retrieval.image_patch = 4
  c.retrieval.image_layers = 1
  c.retrieval.image_width = 32
  c.retrieval.image_heads = 2
  c.retrieval.learning_rate = 1e-3
  c.retrieval.batch_size = 32
  c.retrieval.steps = 20
  c.model.num_layers = 2
  c.model.d_model = 64
  c.model.num_heads = 2
  c.model.head_dim = 32
  c.model.d_ff = 256
  c.model.seq_len = 128
  c.model.dtype = "float32"
  c.model.remat_policy = "none"
  c.optimizer.peak_lr = 3e-3
  c.optimizer.warmup_steps = 5
  c.workdir = "outputs/tiny"
  c.train.steps = 20
  c.train.batch_size = 8
  c.train.log_every = 5
  c.train.eval_every = 10
  c.train.checkpoint_every = 10
  c.sft.records_per_task = 16
  c.sft.eval_records_per_task = 8
  c.sft.steps = 4
  c.sft.peak_lr = 1e-3
  c.sft.warmup_steps = 1
  c.sft.eval_every = 2
  c.sft.checkpoint_every = 2
  c.decoding.num_candidates = 2
  c.decoding.max_text_tokens = 16
  c.eval.num_prompts = 4
  c.eval.num_candidates = 2
  c.eval.num_captions = 4
  c.eval.num_infill = 4
  c.eval.num_binding = 4
  c.eval.num_vqa = 4
  c.eval.num_fid_real = 16
  return c
