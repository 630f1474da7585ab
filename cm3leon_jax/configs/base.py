"""Every config field, with defaults. Presets start here and change what they need.

Sections: vocab, text_tokenizer, vq, data, retrieval, model, optimizer, train, sft, mesh,
decoding, eval.
Sizes derived from others (the vocabulary size, tokens per image) are computed by code
(`Vocab.from_config`, `tokens_per_image`), never stored twice.
"""

import ml_collections

from cm3leon_jax.data import shapes

# Logical axis name -> mesh axes. One table for parameters and activations (MaxText style).
DEFAULT_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("codes", None),
)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "base"
  # Every artifact of a run lives under workdir (see cm3leon_jax/paths.py).
  c.workdir = "outputs/base"

  # Shared vocabulary (cm3leon_jax/tokenizers/vocab.py); image codes come from vq.codebook_size.
  c.vocab = ml_collections.ConfigDict()
  c.vocab.text_size = 56320
  c.vocab.num_sentinels = 16
  c.vocab.pad_multiple = 128
  c.vocab.size = 0  # 0: used ids rounded up to pad_multiple; else an explicit table size.

  c.text_tokenizer = ml_collections.ConfigDict()
  c.text_tokenizer.normalization = "nfkc"  # "nfkc" | "none"
  c.text_tokenizer.min_frequency = 2

  # VQ image tokenizer (Make-A-Scene family: 256 px -> 32x32 grid of 8192 codes).
  c.vq = ml_collections.ConfigDict()
  c.vq.image_size = 256
  c.vq.downsample = 8  # 4, 8 or 16
  c.vq.codebook_size = 8192
  c.vq.code_dim = 256
  c.vq.base_channels = 128
  c.vq.channel_mult = (1, 1, 2, 2)
  c.vq.num_res_blocks = 2
  c.vq.commitment_cost = 0.25
  c.vq.l2_normalize = True
  # Colour-factorised codes (tokenizers/vq.py): > 0 gives each cell a geometry code (of
  # codebook_size) and a colour code (of colour_codes, colour_dim wide); tokens = the product.
  c.vq.colour_codes = 0
  c.vq.colour_dim = 8
  c.vq.recon_loss = "l1"  # "l1" | "l2"
  c.vq.warmup_steps = 0  # linear LR warmup; 0: min(100, steps // 10) (400 on quickstart: no gain)
  c.vq.gan_weight = 0.1
  c.vq.gan_start_step = 20000
  c.vq.dead_code_threshold = 1e-3
  c.vq.learning_rate = 1e-4
  c.vq.batch_size = 64
  c.vq.steps = 200000

  c.data = ml_collections.ConfigDict()
  c.data.dataset = "shapes"  # shapes | coco_captions | image_text_folder
  c.data.data_dir = ""  # "": <workdir>/data
  c.data.manual_dir = ""
  c.data.num_train = 100000
  c.data.num_eval = 2000
  c.data.max_objects = 3
  c.data.max_skipped_fraction = 0.05
  # Shapes held-out split: scenes with a (colour, shape) pair never seen in train (shapes.py).
  c.data.num_heldout = 1000
  c.data.seed = 0  # Shapes scene seed (scene i of a split is a pure function of it)
  # Real-data guards (data/images.py): images whose header claims more pixels are skipped
  # before decoding (decompression bombs); longer captions are skipped, not cut.
  c.data.max_image_pixels = 40_000_000
  c.data.max_caption_chars = 2000
  c.data.packing = True
  c.data.packing_bins = 0  # first-fit packing bins per process; 0: the local batch size
  c.data.shuffle_seed = 0
  c.data.num_workers = 2
  c.data.prefetch = 2
  # CM3 objective (REFERENCE.md section 2): spans ~ Poisson(rate) clamped to [min, max].
  c.data.cm3_poisson_rate = 1.0
  c.data.cm3_min_spans = 0
  c.data.cm3_max_spans = 15
  c.data.causal_fraction = 0.0  # extra fraction of sequences left unmasked
  c.data.image_first_rate = 0.5  # "image first" rotation (captioning direction)

  c.retrieval = ml_collections.ConfigDict()
  c.retrieval.enabled = True
  c.retrieval.embed_dim = 512
  c.retrieval.text_layers = 6
  c.retrieval.text_width = 512
  c.retrieval.text_heads = 8
  c.retrieval.text_max_len = 77
  c.retrieval.image_patch = 32
  c.retrieval.image_layers = 6
  c.retrieval.image_width = 512
  c.retrieval.image_heads = 8
  c.retrieval.image_stem = 0  # channels of a 3x3 conv before the patches; 0: a plain ViT
  c.retrieval.temperature_init = 0.07
  # Hard negatives (NegCLIP, data/word_swap.py): with this probability a pair also gets its
  # caption with one word of `swap_groups` swapped, an extra negative for its image. 0 = CLIP.
  c.retrieval.hard_negatives = 0.0
  # Encoder training packs several captions per row of the text tower (retrieval/
  # text_packing.py: the same embeddings, fewer padding slots). False: one caption per row.
  c.retrieval.pack_text = True
  # Encoder training holds this process's share of the training pairs in memory once read
  # when their images take at most this many MiB (the run goes over them many times: 600
  # batches of 256 are ~8 epochs of the quickstart's 20,000). 0: read every pair from the
  # dataset each time it comes round.
  c.retrieval.pairs_in_memory_mb = 1024
  c.retrieval.swap_groups = (" ".join(shapes.COLOUR_NAMES), " ".join(shapes.SHAPES),
                             " ".join(shapes.SIZE_NAMES))
  c.retrieval.learning_rate = 5e-4
  c.retrieval.batch_size = 1024
  c.retrieval.steps = 50000
  c.retrieval.k_per_modality = 2
  c.retrieval.num_train_docs = 3
  # Fraction of training examples assembled without retrieved documents (the query alone,
  # drawn per example). 0 = the paper's recipe: every document gets its neighbours. Tried on
  # the quickstart preset (one 5,600-step decoder, same upstream artifacts; text-to-image
  # all-attributes, 64 never-seen / 64 seen-pair prompts, 16 candidates) because the ablations
  # found training without retrieval better on never-seen pairs: 0.5 gave 54.7% / 87.5% with
  # 2 retrieved at inference, 59.4% / 82.8% with 0, against the recipe's decoder's 59.4% /
  # 92.2% (2) and 50.0% / 82.8% (0). Not adopted.
  c.retrieval.no_retrieval_rate = 0.0
  c.retrieval.query_dropout = 0.2
  c.retrieval.max_score = 0.9
  c.retrieval.brute_force_below = 20000
  c.retrieval.num_leaves = 0  # 0: about sqrt(bank size)
  c.retrieval.leaves_to_search = 0  # 0: chosen from num_leaves
  c.retrieval.reorder = 100
  c.retrieval.spherical_tree = True  # spherical k-means partitions of the (unit-norm) bank
  c.retrieval.soar_lambda = 1.0  # SOAR spilling (ScaNN); 0 = each vector in one leaf only
  # Candidates kept before reordering, x the reorder count, with spilling; in (1, 2]. 1.01,
  # not ScaNN's 2.0: 108k vs 96k queries/s at recall@10 0.95 on the 1M encoder bank
  # (experiments/bench/retrieval.py). Not exactly 1: ScaNN 1.4.2 saves no SOAR data then and
  # cannot load the index (retrieval/index.py).
  c.retrieval.soar_overretrieve = 1.01
  c.retrieval.num_shards = 1

  # Decoder (REFERENCE.md section 4).
  # `cm3leon quickstart`: wall-clock seconds for all its stages (0: no limit). Only the decoder
  # adapts: it gets what the stages before it left, less train.time_budget_reserve_steps
  # step-times for the evaluation after it (train/time_budget.py).
  c.quickstart = ml_collections.ConfigDict()
  c.quickstart.budget_s = 0.0

  c.model = ml_collections.ConfigDict()
  c.model.num_layers = 24
  c.model.d_model = 1024
  c.model.num_heads = 16
  c.model.head_dim = 64
  c.model.d_ff = 4096
  c.model.seq_len = 4096
  c.model.activation = "relu"  # relu | gelu | swiglu
  c.model.tie_embeddings = True
  c.model.qk_norm = False
  # Not in the paper: a learned embedding of each image token's raster index (0..N-1 inside its
  # image), added to its token embedding. A tiny decoder trained for minutes cannot learn where
  # in the image it is from absolute positions alone (the caption before it varies in length);
  # the quickstart preset turns it on (issue 9 note).
  c.model.image_positions = False
  c.model.z_loss = 0.0  # Chameleon used 1e-5
  c.model.init_std = 0.006
  c.model.pos_init_std = 0.0002
  c.model.dtype = "bfloat16"  # compute
  c.model.param_dtype = "float32"
  c.model.scan_layers = True
  c.model.remat_policy = "nothing_saveable"  # none | dots_saveable | nothing_saveable
  c.model.attention = "auto"  # auto | xla | cudnn | cudnn_packed | splash
  # Decode steps of few rows: fused Pallas matrix-vector kernels (model/matvec.py) instead of
  # XLA's dots. auto: on a GPU, <= 2 rows (batch 1, with or without CFG; 1.88x at 350M on an
  # H200); pallas: <= 8 rows, everywhere (off GPU in Pallas' interpreter: tests, not speed).
  c.model.decode_matvec = "auto"  # auto | xla | pallas
  # With those kernels: the attention over the cache as JAX's Pallas decode-attention kernel,
  # reading only the written slots (one cache window). Not yet measured on a GPU: off.
  c.model.decode_attention = "xla"  # xla | pallas

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.peak_lr = 6e-4
  c.optimizer.warmup_steps = 1500
  c.optimizer.decay = "cosine"  # cosine | linear | constant
  c.optimizer.end_lr_ratio = 0.1
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.1
  c.optimizer.clip_norm = 1.0

  c.train = ml_collections.ConfigDict()
  c.train.seed = 0
  c.train.steps = 100000
  # Wall-clock seconds the run may take (train/time_budget.py): after 50 timed steps the run's
  # length becomes the most steps that fit, at most train.steps; 0: exactly train.steps.
  c.train.time_budget_s = 0.0
  c.train.time_budget_reserve_steps = 0  # step-times kept back for what follows training
  # Depth for a short budget: when the calibration finds that fewer than `min_steps` of this
  # depth fit, the trainer starts afresh with `fallback_layers` layers (and calibrates again);
  # 0 (either): never. The run then records `depth_from` = the configured depth in its
  # checkpoints' config, and every command that loads the decoder (eval, generate, sft,
  # export, a resumed train) takes the checkpoint's depth when its own config has that one
  # (train/checkpoint.py adopt_budget_depth). `depth_from` is the trainer's to set, not yours.
  c.train.time_budget_min_steps = 0
  c.train.time_budget_fallback_layers = 0
  c.train.time_budget_depth_from = 0
  # Midway through a fitted run the trainer fits its length again from the steps timed since
  # (train/time_budget.py); where that changes the length, these hold the step and the length
  # before, and the learning-rate schedule stretches from there (train/optimizer.py). The
  # trainer's to set, not yours; 0: no re-fit.
  c.train.time_budget_refit_step = 0
  c.train.time_budget_refit_from = 0
  c.train.batch_size = 2048  # sequences per optimizer step, global
  c.train.grad_accum = 1
  c.train.log_every = 10
  c.train.eval_every = 1000  # held-out loss (cm3leon train); 0: never
  c.train.eval_batches = 4  # fixed batches of the `eval` split
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 3

  # `cm3leon sft` (train/sft.py): instruction tuning (REFERENCE.md 6), the CM3 objective on the
  # Shapes task records (data/tasks.py), starting from the pretrained decoder's parameters with
  # a fresh optimizer. Everything else (batch, mesh, optimizer betas, clipping) is train's and
  # optimizer's. Paper: LR 5e-5, warmup 150, ~30B tokens in 2M-token batches (~15k steps).
  c.sft = ml_collections.ConfigDict()
  c.sft.tasks = "caption_image,image_caption,edit,grounded,seg_to_image,edge_to_image," \
                "segmentation,vqa,how_to_write"  # comma-separated data/tasks.py TASKS
  c.sft.records_per_task = 20000  # training records rendered per task (train scenes)
  c.sft.eval_records_per_task = 64  # held-out loss records per task (eval scenes)
  # Mixture balancing (paper: thresholds 3 / 0.3): a task's sampling weight is its share of
  # the records scaled towards equal shares, by at most balance_up and at least balance_down.
  c.sft.balance_up = 3.0
  c.sft.balance_down = 0.3
  # The pretraining documents (with their retrieved neighbours) as one more member of the
  # mixture, weighted like this many SFT tasks (0: instruction data only).
  c.sft.pretrain_weight = 0.0
  c.sft.steps = 15000
  c.sft.peak_lr = 5e-5
  c.sft.warmup_steps = 150
  c.sft.eval_every = 1000  # held-out loss on the tasks' eval records; 0: never
  c.sft.checkpoint_every = 1000

  # Mesh ('data', 'fsdp', 'tensor'); -1 takes the remaining devices. Multi-slice puts data
  # across slices.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  # Multislice: slices the data axis is split over (0 = as the devices say: TPU slice_index).
  c.mesh.num_slices = 0
  c.mesh.axis_rules = DEFAULT_AXIS_RULES

  c.decoding = ml_collections.ConfigDict()
  c.decoding.temperature = 1.0
  c.decoding.top_p = 0.9
  c.decoding.top_k = 0
  c.decoding.cfg_weight = 3.0
  c.decoding.cdk_k = 8  # the quickstart measured k=8 drawing junk on a small decoder; it uses 1
  c.decoding.cdk_alpha = 0.5
  c.decoding.num_candidates = 8
  c.decoding.pool = "mixed"  # top_p | cdk | mixed
  c.decoding.num_retrieved = 2
  c.decoding.max_text_tokens = 64
  c.decoding.seed = 0
  # New tokens per cache window of the sampler (0: one window, the whole cache every step);
  # smaller windows read fewer empty slots and compile one more loop copy each (decode/sampler.py).
  c.decoding.cache_window = 256

  # `cm3leon eval` (cm3leon_jax/eval/suite.py): how many examples each stage of a suite uses.
  # Text-to-image costs num_prompts * num_candidates * 2 (CFG) prefills of the retrieval-
  # augmented prompt: the dominant cost of the quickstart suite.
  c.eval = ml_collections.ConfigDict()
  c.eval.num_prompts = 32  # held-out single-object prompts (text-to-image)
  c.eval.num_candidates = 8  # pool per prompt, re-ranked (the paper's 8)
  c.eval.num_captions = 64  # eval images captioned (caption attribute recall, CIDEr-D)
  # Text after the image in the captioning prompt: "" = the pretraining causal prompt
  # `<break> I <break>`; "Describe the given picture." = the SFT template (data/tasks.py), for a
  # decoder from `cm3leon sft`, which answers the bare prompt with a question of its own.
  c.eval.caption_instruction = ""
  c.eval.num_binding = 48  # single-object eval scenes of the attribute-binding probe
  c.eval.num_infill = 32  # eval images infilled
  c.eval.num_vqa = 64  # eval images asked one question each (`--suite vqa`; kinds in turn)
  c.eval.infill_row = 1  # the 3x3 grid row whose band of code rows is masked (1 = middle)
  c.eval.num_fid_real = 300  # real held-out single-object images FID compares against
  c.eval.fid_features = "encoder"  # encoder (dual encoder image tower) | pixels | inception
  # The .npz of Inception-v3 weights that fid_features="inception" needs ("" = none): nothing
  # downloads them; `python -m experiments.convert_inception` makes it from pytorch-fid's
  # pt_inception-2015-12-05-*.pth (the FID network's weights) or a torchvision state dict.
  c.eval.inception_weights = ""
  c.eval.seed = 0
  return c


def tokens_per_image(config) -> int:
  side = config.vq.image_size // config.vq.downsample
  return side * side
