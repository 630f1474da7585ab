"""The decoder (cm3leon_jax/model/): forward against a plain numpy reference, packing, init,
attention backends, logical axis names, bad configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cm3leon_jax import configs
from cm3leon_jax.errors import InputError
from cm3leon_jax.model import attention as A
from cm3leon_jax.model.decoder import Decoder, DecoderConfig, param_count
from cm3leon_jax.train.synthetic import synthetic_batch


def tiny(*overrides):
  return configs.load("tiny", list(overrides))


def make(*overrides, seed=0, randomise_zero_init=True):
  """A tiny decoder; zero-initialised projections get random values so every path matters."""
  model = Decoder(DecoderConfig.from_config(tiny(*overrides)), rngs=nnx.Rngs(seed))
  if randomise_zero_init:
    rng = np.random.default_rng(seed + 1)
    for name in ("wo", "w_out"):
      p = getattr(model.layers, name)
      p[...] = jnp.asarray(rng.normal(0, 0.05, p.shape), p.dtype)
    if hasattr(model, "head"):
      model.head[...] = jnp.asarray(rng.normal(0, 0.05, model.head.shape), jnp.float32)
  return model


# --- a straightforward reference: one sequence, one head at a time, plain numpy ---------------
def ref_layer_norm(x):
  return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)


def ref_forward(model: Decoder, inputs, positions, segment_ids):
  cfg = model.cfg
  p = {k: np.asarray(v, np.float64) for k, v in model.layers.arrays().items()}
  embed, pos = np.asarray(model.embed[...], np.float64), np.asarray(model.pos_embed[...], np.float64)
  out = []
  for row in range(inputs.shape[0]):
    x = embed[inputs[row]] + pos[positions[row]]
    L = x.shape[0]
    for layer in range(cfg.num_layers):
      h = ref_layer_norm(x)
      attn = np.zeros((L, cfg.num_heads, cfg.head_dim))
      for head in range(cfg.num_heads):
        q = h @ p["wq"][layer][:, head]
        k = h @ p["wk"][layer][:, head]
        v = h @ p["wv"][layer][:, head]
        if cfg.qk_norm:
          q, k = ref_layer_norm(q), ref_layer_norm(k)
        for i in range(L):
          visible = [j for j in range(i + 1) if segment_ids[row, j] == segment_ids[row, i]]
          s = np.array([q[i] @ k[j] for j in visible]) / np.sqrt(cfg.head_dim)
          w = np.exp(s - s.max())
          attn[i, head] = (w / w.sum()) @ v[visible]
      x = x + np.einsum("LHK,HKD->LD", attn, p["wo"][layer])
      h = ref_layer_norm(x)
      up = h @ p["w_in"][layer]
      if cfg.activation == "relu":
        act = np.maximum(up, 0)
      elif cfg.activation == "swiglu":
        gate = h @ p["w_gate"][layer]
        act = gate / (1 + np.exp(-gate)) * up
      else:
        raise NotImplementedError(cfg.activation)
      x = x + act @ p["w_out"][layer]
    head = embed.T if cfg.tie_embeddings else np.asarray(model.head[...], np.float64)
    out.append(ref_layer_norm(x) @ head)
  return np.stack(out)


def small_batch(config, rows=2, length=24):
  """A packed batch cut to `length` tokens: two sequences in row 0, one + padding in row 1."""
  b = synthetic_batch(config, rows, seed=3)
  seg = np.zeros((rows, length), np.int32)
  seg[0, :10], seg[0, 10:] = 1, 2
  seg[1, :17] = 1
  pos = np.zeros_like(seg)
  for r in range(rows):
    for s in np.unique(seg[r]):
      idx = np.flatnonzero(seg[r] == s)
      pos[r, idx] = np.arange(len(idx))
  return b["inputs"][:, :length], pos, seg


@pytest.mark.parametrize("overrides", [
    (),
    ("model.qk_norm=True", "model.tie_embeddings=False", "model.activation=swiglu",
     "model.scan_layers=False"),
], ids=["paper", "qknorm_untied_swiglu_unrolled"])
def test_forward_matches_numpy_reference_in_float32(overrides):
  model = make(*overrides)
  inputs, positions, segs = small_batch(tiny())
  logits = model(jnp.asarray(inputs), jnp.asarray(positions), jnp.asarray(segs))
  assert logits.dtype == jnp.float32 and logits.shape == (2, 24, model.cfg.vocab_size)
  np.testing.assert_allclose(np.asarray(logits), ref_forward(model, inputs, positions, segs),
                             atol=2e-4, rtol=1e-3)


def test_scanned_and_unrolled_layers_agree():
  inputs, positions, segs = small_batch(tiny())
  a = make()(inputs, positions, segs)
  b = make("model.scan_layers=False", "model.remat_policy=nothing_saveable")(inputs, positions, segs)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_packed_sequences_do_not_see_each_other():
  model = make()
  inputs, positions, segs = small_batch(tiny())
  changed = inputs.copy()
  changed[0, :10] = (changed[0, :10] + 7) % model.cfg.vocab_size  # rewrite sequence 1 of row 0
  a = np.asarray(model(inputs, positions, segs))
  b = np.asarray(model(changed, positions, segs))
  np.testing.assert_array_equal(a[0, 10:], b[0, 10:])  # sequence 2 unaffected
  assert np.abs(a[0, :10] - b[0, :10]).max() > 1e-3


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = make("model.dtype=bfloat16")
  inputs, positions, segs = small_batch(tiny())
  logits = model(inputs, positions, segs)
  assert logits.dtype == jnp.float32
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(model)))
  ref = make()(inputs, positions, segs)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=0.05)


def test_init_follows_the_paper():
  config = tiny("model.tie_embeddings=False", "model.d_model=256", "model.num_heads=8")
  model = Decoder(DecoderConfig.from_config(config), rngs=nnx.Rngs(0))
  embed = np.asarray(model.embed[...])
  assert abs(embed.std() - 0.006 * 0.986) < 2e-4  # std of N(0, 0.006) truncated at 3 std
  assert np.abs(embed).max() <= 3 * 0.006 + 1e-9
  assert abs(np.asarray(model.pos_embed[...]).std() - 0.0002 * 0.986) < 1e-5
  for name in ("wo", "w_out"):
    assert not np.asarray(getattr(model.layers, name)[...]).any()
  assert not np.asarray(model.head[...]).any()  # untied head: an output layer, starts at 0
  wq = np.asarray(model.layers.wq[...])
  assert abs(wq.std() - 0.006 * 0.986) < 2e-4
  assert not np.allclose(wq[0], wq[1])  # layers are initialised independently


def test_every_parameter_has_logical_axis_names():
  model = make("model.tie_embeddings=False", "model.activation=swiglu", randomise_zero_init=False)
  params = jax.tree.leaves(nnx.state(model, nnx.Param),
                           is_leaf=lambda x: isinstance(x, nnx.Variable))
  known = {name for name, _ in tiny().mesh.axis_rules}
  for p in params:
    axes = p.get_metadata()["out_sharding"]
    assert len(axes) == p.ndim and set(axes) <= known, axes
  assert sum(p.size for p in params) == param_count(model.cfg)


def test_param_count_by_hand():
  cfg = DecoderConfig.from_config(tiny())  # 2 layers, d 64, ff 256, vocab 512, seq 128
  per_layer = 4 * 64 * 64 + 2 * 64 * 256
  assert param_count(cfg, embeddings=False) == 2 * per_layer
  assert param_count(cfg) == 2 * per_layer + 512 * 64 + 128 * 64


def _qkv(B=2, L=128, H=2, K=32, seed=0):
  r = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(r.normal(size=(B, L, H, K)), jnp.float32) for _ in range(3))
  seg = np.ones((B, L), np.int32)
  seg[0, 50:], seg[0, 100:], seg[1, 90:] = 2, 0, 0
  return q, k, v, jnp.asarray(seg)


def test_attention_reference_is_causal_and_segment_local():
  q, k, v, seg = _qkv()
  out = A.attention(q, k, v, seg, seg, backend="xla")
  # Token 50 of row 0 starts segment 2: it sees only itself, so its output is its own value.
  np.testing.assert_allclose(out[0, 50], v[0, 50], atol=1e-6)
  np.testing.assert_allclose(out[1, 0], v[1, 0], atol=1e-6)


def test_cudnn_path_matches_reference():
  """Same `jax.nn.dot_product_attention` call as on GPU (its XLA implementation on CPU)."""
  q, k, v, seg = _qkv()
  idx = jnp.broadcast_to(jnp.arange(128), (2, 128))
  mask = A.attention_mask(seg, seg, idx, idx)
  ref = A.attention(q, k, v, seg, seg, backend="xla")
  np.testing.assert_allclose(A.cudnn_attention(q, k, v, mask), ref, atol=1e-5)
  # Self-attention passes is_causal too (block skipping); the segment mask still applies.
  np.testing.assert_allclose(A.cudnn_attention(q, k, v, mask, is_causal=True), ref, atol=1e-5)


def test_splash_kernel_matches_reference_with_segment_ids():
  """Pallas splash attention (TPU kernel) in interpret mode on CPU."""
  q, k, v, seg = _qkv()
  out = A.splash_attention(q, k, v, seg, seg, interpret=True)
  np.testing.assert_allclose(out, A.attention(q, k, v, seg, seg, backend="xla"), atol=1e-5)


def test_cached_style_indices_equal_self_attention():
  """Keys in cache slots past the query index are invisible (what a KV cache relies on)."""
  q, k, v, seg = _qkv()
  full = A.attention(q, k, v, seg, seg, backend="xla")
  idx = jnp.broadcast_to(jnp.arange(128), (2, 128))
  last = A.attention(q[:, 40:41], k, v, seg[:, 40:41], seg, idx[:, 40:41], idx, backend="xla")
  np.testing.assert_allclose(last[:, 0], full[:, 40], atol=1e-6)


def test_single_query_attention_equals_the_reference_on_a_flat_cache():
  """The decode step's attention over a [B * H, S, K] cache equals the [B, S, H, K] reference."""
  q, k, v, seg = _qkv()
  B, S, H, K = k.shape
  idx = jnp.broadcast_to(jnp.arange(S), (B, S))
  q_index = idx[:, 40:41]
  mask_BS = A.attention_mask(seg[:, 40:41], seg, q_index, idx)[:, 0]
  flat = lambda x: jnp.swapaxes(x, 1, 2).reshape(B * H, S, K)
  got = A.single_query_attention(q[:, 40], flat(k), flat(v), mask_BS)
  want = A.attention(q[:, 40:41], k, v, seg[:, 40:41], seg, q_index, idx, backend="xla")[:, 0]
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_sharder_merges_logical_axes_of_one_dimension():
  from cm3leon_jax.model.layers import Sharder
  from cm3leon_jax.train.mesh import axis_rules, make_mesh
  config = tiny("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
  mesh = make_mesh(config.mesh)
  x = jnp.zeros((4 * 4, 8, 4))  # [batch * heads, slots, kv]: batch 4, heads 4
  with jax.set_mesh(mesh):
    y = jax.jit(lambda x: Sharder(axis_rules(config))(x, (("batch", "heads"), "length", "kv")))(x)
  # batch -> (data, fsdp), heads -> tensor: the merged axis is split over all three, batch-major.
  assert tuple(y.sharding.spec)[0] == ("data", "fsdp", "tensor")
  assert y.sharding.shard_shape(x.shape) == (2, 8, 4)


def test_auto_backend_per_platform():
  assert A.resolve_backend("auto", "cpu") == "xla"
  assert A.resolve_backend("auto", "gpu") == "cudnn_packed"
  assert A.resolve_backend("auto", "tpu") == "splash"
  with A.compiling_for_tpu():
    assert A.resolve_backend("auto") == "splash"


@pytest.mark.parametrize("overrides, field", [
    (("model.num_heads=3",), "model.num_heads=3"),
    (("model.head_dim=16",), "model.head_dim=16"),
])
def test_heads_that_do_not_divide_d_model_are_an_input_error(overrides, field):
  with pytest.raises(InputError, match=field):
    DecoderConfig.from_config(tiny(*overrides))


def test_chunked_causal_attention_matches_reference():
  q, k, v, seg = _qkv()
  idx = jnp.broadcast_to(jnp.arange(128), (2, 128))
  mask = A.attention_mask(seg, seg, idx, idx)
  want = A.xla_attention(q, k, v, mask)
  for chunk in (32, 48, 128):  # 48 leaves a ragged last chunk
    np.testing.assert_allclose(A.chunked_causal_attention(q, k, v, mask, chunk), want, atol=2e-6)
  grads = [jax.grad(lambda q: jnp.sum(jnp.sin(f(q, k, v, mask))))(q)
           for f in (A.xla_attention, lambda *a: A.chunked_causal_attention(*a, 32))]
  np.testing.assert_allclose(grads[0], grads[1], atol=1e-5)


def test_lm_head_backward_runs_in_the_compute_dtype():
  """The head's gradients equal autodiff of the same float32-accumulated dot: exactly in float32;
  in bfloat16 the cotangent is cast to bfloat16 first (the backward GEMMs run in bf16), so the
  gradients agree to bf16 rounding and come out in the inputs' dtype."""
  from cm3leon_jax.model.decoder import lm_head
  rng = np.random.default_rng(0)
  h = rng.normal(size=(2, 3, 8)).astype(np.float32)
  w = rng.normal(size=(16, 8)).astype(np.float32)
  g = rng.normal(size=(2, 3, 16)).astype(np.float32)
  plain = lambda h, w: jnp.einsum("BLD,VD->BLV", h, w, preferred_element_type=jnp.float32)
  for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 3e-2)):
    hd, wd = jnp.asarray(h, dtype), jnp.asarray(w, dtype)
    out, vjp = jax.vjp(lm_head, hd, wd)
    ref_out, ref_vjp = jax.vjp(plain, hd, wd)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, ref_out)
    for got, want, x in zip(vjp(jnp.asarray(g)), ref_vjp(jnp.asarray(g)), (hd, wd)):
      assert got.dtype == x.dtype
      np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                 rtol=tol, atol=tol * 4)
  # By hand, float32: d logits / d h = g @ w, d logits / d w = g^T h.
  dh, dw = jax.vjp(lm_head, jnp.asarray(h), jnp.asarray(w))[1](jnp.asarray(g))
  np.testing.assert_allclose(dh, np.einsum("blv,vd->bld", g, w), rtol=1e-5)
  np.testing.assert_allclose(dw, np.einsum("blv,bld->vd", g, h), rtol=1e-5)


def test_packed_layout_by_hand():
  """Runs of segment ids -> cuDNN's packed layout: lengths and starts, -1 past the last run."""
  seg = jnp.asarray([[1, 1, 1, 2, 2, 0, 0, 0],
                     [1, 1, 1, 1, 1, 1, 1, 1],
                     [1, 2, 3, 4, 0, 0, 0, 0]], jnp.int32)
  seqlen, offsets, fits = A.packed_layout(seg, max_segments=4)
  np.testing.assert_array_equal(seqlen, [[3, 2, 3, -1], [8, -1, -1, -1], [1, 1, 1, 1]])
  np.testing.assert_array_equal(offsets, [[0, 3, 5, -1, -1], [0, -1, -1, -1, -1],
                                          [0, 1, 2, 3, -1]])
  np.testing.assert_array_equal(fits, [True, True, False])  # row 3: 5 runs (padding is one)


def test_packed_layout_describes_the_attention_mask():
  """Causal attention inside each run of the layout is exactly `attention_mask`'s pattern."""
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 9, size=(3, 6))
  rows = []
  for row in lengths:
    ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(row)])[:40]
    rows.append(np.pad(ids, (0, 40 - len(ids))))
  seg = jnp.asarray(np.stack(rows), jnp.int32)
  seqlen, offsets, fits = A.packed_layout(seg, max_segments=8)
  assert bool(jnp.all(fits))
  run = np.full(seg.shape, -1)
  for b in range(seg.shape[0]):
    for m in range(seqlen.shape[1]):
      if seqlen[b, m] > 0:
        run[b, offsets[b, m]:offsets[b, m] + seqlen[b, m]] = m
  assert (run >= 0).all()  # every token, padding included, lies in one run
  index = np.broadcast_to(np.arange(40), seg.shape)
  want = A.attention_mask(seg, seg, jnp.asarray(index), jnp.asarray(index))
  got = (run[:, :, None] == run[:, None, :]) & (index[:, None, :] <= index[:, :, None])
  np.testing.assert_array_equal(got, want)


def test_cudnn_packed_backend_matches_reference_off_gpu():
  """Off GPU "cudnn_packed" runs JAX's XLA attention with the mask: the reference's result."""
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 16, 2, 8)), jnp.bfloat16) for _ in range(3))
  seg = jnp.asarray([[1] * 10 + [2] * 4 + [0] * 2, [1] * 16], jnp.int32)
  got = A.attention(q, k, v, seg, seg, backend="cudnn_packed")
  index = jnp.broadcast_to(jnp.arange(16), (2, 16))
  want = A.xla_attention(q, k, v, A.attention_mask(seg, seg, index, index))
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=2e-2)


def test_cudnn_packed_warns_and_uses_the_mask_if_jax_moves_its_cudnn_module(monkeypatch):
  """The packed layout comes from a private JAX module: if a release moves it, one warning and
  the masked cuDNN path, not a crash."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_sdpa
  monkeypatch.delattr(cudnn_sdpa, "dot_product_attention")
  A._cudnn_sdpa_module.cache_clear()
  try:
    with pytest.warns(UserWarning, match="packed layout is unavailable"):
      assert A._cudnn_sdpa_module() is None
  finally:
    A._cudnn_sdpa_module.cache_clear()  # the next caller sees the real module again


def _emulated_packed_kernel(q_BLHK, k_BLHK, v_BLHK, seqlen_BM, offsets_BM1):
  """cuDNN's packed layout emulated off GPU: causal attention inside each described run; a
  token past the described runs sees no key (so a row with too many runs comes out wrong, as
  the layout would make it)."""
  L = q_BLHK.shape[1]
  index_L = jnp.arange(L)
  inside_BML = ((index_L >= offsets_BM1[:, :-1, None])
                & (index_L < offsets_BM1[:, :-1, None] + seqlen_BM[:, :, None])
                & (seqlen_BM[:, :, None] > 0))
  run_BL = jnp.where(inside_BML.any(1), jnp.argmax(inside_BML, axis=1), -1)
  mask_BLL = ((run_BL[:, :, None] == run_BL[:, None, :]) & (run_BL[:, :, None] >= 0)
              & (index_L[None, None, :] <= index_L[None, :, None]))
  return A.xla_attention(q_BLHK, k_BLHK, v_BLHK, mask_BLL)


def test_cudnn_packed_takes_the_masked_path_past_the_layout_forward_and_backward(monkeypatch):
  """With the packed kernel present (emulated here), a batch whose rows all fit the layout
  uses it, and a batch with a row of MAX_PACKED_SEGMENTS + 8 runs takes the masked fallback,
  whose mask is rebuilt in the backward pass: outputs and q/k/v gradients equal the
  reference's for both batches, although the layout alone gets the long row wrong."""
  monkeypatch.setattr(A, "_packed_kernel", lambda: _emulated_packed_kernel)
  L, runs = 64, A.MAX_PACKED_SEGMENTS + 8
  rng = np.random.default_rng(4)
  q, k, v = (jnp.asarray(rng.normal(size=(2, L, 2, 8)), jnp.bfloat16) for _ in range(3))
  fitting = np.zeros((2, L), np.int32)
  fitting[0, :20], fitting[0, 20:50], fitting[1, :] = 1, 2, 1
  too_many = fitting.copy()
  too_many[1, :runs], too_many[1, runs:] = np.arange(1, runs + 1), 0
  index = jnp.broadcast_to(jnp.arange(L), (2, L))
  f32 = lambda x: x.astype(jnp.float32)
  for seg in (jnp.asarray(fitting), jnp.asarray(too_many)):
    mask = A.attention_mask(seg, seg, index, index)
    ref = lambda q, k, v: jnp.sum(jnp.sin(A.xla_attention(f32(q), f32(k), f32(v), mask)))
    got = lambda q, k, v: jnp.sum(jnp.sin(f32(A.attention(q, k, v, seg, seg,
                                                          backend="cudnn_packed"))))
    np.testing.assert_allclose(got(q, k, v), ref(q, k, v), rtol=2e-2)
    for g_new, g_ref in zip(jax.grad(got, (0, 1, 2))(q, k, v), jax.grad(ref, (0, 1, 2))(q, k, v)):
      np.testing.assert_allclose(f32(g_new), g_ref, rtol=2e-2, atol=3e-2)
  layout_only = _emulated_packed_kernel(q, k, v, *A.packed_layout(jnp.asarray(too_many))[:2])
  exact = A.xla_attention(q, k, v, A.attention_mask(jnp.asarray(too_many),
                                                    jnp.asarray(too_many), index, index))
  assert float(jnp.abs(f32(layout_only[1]) - f32(exact[1])).max()) > 0.1
