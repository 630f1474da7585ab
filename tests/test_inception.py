"""eval/inception.py: FID's Inception-v3 pool3 features from a local weights file.

The port is proven against the PyTorch originals when they are importable (torch, torchvision
and pytorch-fid from requirements-bench.txt; CI has none of them and skips those tests): the
torchvision variant against torchvision's `inception_v3`, the FID variant against pytorch-fid's
`InceptionV3` end to end, both on the same random weights and images.
"""

import contextlib
import importlib.util
import sys
import types

import jax
import numpy as np
import pytest

from cm3leon_jax import configs
from cm3leon_jax.errors import InputError
from cm3leon_jax.eval import features, inception


@pytest.fixture(scope="module")
def state():
  return inception.init_state_dict(seed=0)


@pytest.fixture(scope="module")
def images():
  # Non-square, so a swapped height/width anywhere in the resize changes the numbers.
  return np.random.default_rng(1).integers(0, 256, (2, 40, 32, 3), np.uint8)


@pytest.fixture(scope="module")
def reference(state, images):
  """FID-variant features of `images` under `state`, folded in memory (one compile, shared)."""
  return inception.extractor(jax.device_put(inception.fold(state)))(images)


def test_random_weights_give_finite_deterministic_2048d_features(state, images, reference):
  assert reference.shape == (2, inception.FEATURE_DIM) and reference.dtype == np.float64
  assert np.isfinite(reference).all() and reference.std() > 0
  assert (reference[0] != reference[1]).any()  # two images, two feature vectors
  np.testing.assert_array_equal(
      inception.extractor(jax.device_put(inception.fold(state)))(images), reference)


def test_batches_and_padding_do_not_change_features(state, images, reference):
  # 3 images in batches of 2: the second batch is padded with one blank image, then cut.
  extract = inception.extractor(jax.device_put(inception.fold(state)), batch_size=2)
  three = extract(np.concatenate([images, images[:1]]))
  np.testing.assert_allclose(three, np.concatenate([reference, reference[:1]]), rtol=1e-6)


def test_npz_round_trip_keeps_features(state, images, reference, tmp_path):
  path = str(tmp_path / "inception.npz")
  inception.save_npz(state, path)
  with np.load(path) as npz:
    assert sorted(npz.files) == sorted(inception.state_dict_shapes())
    assert npz["Mixed_5b.branch1x1.conv.weight"].shape == (64, 192, 1, 1)
  np.testing.assert_array_equal(inception.extractor(inception.load_params(path))(images),
                                reference)


@contextlib.contextmanager
def _torchvision_models():
  """`import torchvision.models...` works inside, or the test skips. PyPI's torchvision wheel is a
  CUDA build: beside a CPU-only torch its C++ ops cannot load and `import torchvision` raises while
  registering their fake kernels. The model code is plain Python needing none of those ops, so then
  torchvision's modules are imported without running its __init__.py (undone on exit)."""
  pytest.importorskip("torch")
  if importlib.util.find_spec("torchvision") is None:
    pytest.skip("torchvision is not installed")
  before, shim = set(sys.modules), False
  try:
    import torchvision  # noqa: F401
  except RuntimeError:
    shim = True
    package = types.ModuleType("torchvision")
    package.__path__ = list(importlib.util.find_spec("torchvision").submodule_search_locations)
    sys.modules["torchvision"] = package
  try:
    yield
  finally:
    for name in set(sys.modules) - before if shim else ():
      if name == "torchvision" or name.startswith("torchvision."):
        del sys.modules[name]


def _load_random_weights(model, state):
  """Our random weights (He-scaled, non-trivial BatchNorm statistics to fold) into a PyTorch
  Inception: every name must be one of its modules', and only its classifier and counters stay."""
  import torch

  result = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
  assert result.unexpected_keys == []
  assert all(k.startswith("fc.") or k.endswith("num_batches_tracked") for k in result.missing_keys)
  return model.eval()


@contextlib.contextmanager
def _one_torch_thread():
  import torch

  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # OpenMP threads on a busy 2-core machine run ~10x slower, not faster
  try:
    yield
  finally:
    torch.set_num_threads(threads)


def test_torchvision_variant_matches_torchvision_inception_v3(state, images, tmp_path):
  with _torchvision_models():
    from torchvision.models.inception import inception_v3
  import torch
  import torch.nn.functional as F

  from experiments import convert_inception

  model = _load_random_weights(inception_v3(weights=None, aux_logits=False, init_weights=False),
                               state)
  pth = str(tmp_path / "torchvision_inception.pth")
  torch.save(model.state_dict(), pth)  # has fc.* and num_batches_tracked: the converter drops them
  npz = str(tmp_path / "inception.npz")
  summary = convert_inception.convert(pth, npz)
  assert summary["tensors"] == len(inception.state_dict_shapes())
  assert {"fc.weight", "fc.bias"} <= set(summary["dropped"])

  pooled = []
  model.avgpool.register_forward_hook(lambda module, inputs, output: pooled.append(output))
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
  x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)  # pytorch-fid's
  with torch.no_grad(), _one_torch_thread():
    model(2 * x - 1)
  expected = pooled[0].flatten(1).numpy()

  ours = inception.extractor(inception.load_params(npz), fid_variant=False)(images)
  assert np.abs(expected).max() > 0.1  # the comparison below is not between near-zero vectors
  np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_fid_variant_matches_pytorch_fid(state, images, reference, monkeypatch):
  # pytorch-fid's InceptionV3 end to end (its resize, scaling and FID blocks), its network built
  # as its fid_inception_v3 builds it, with our random weights instead of the downloaded ones.
  with _torchvision_models():
    P = pytest.importorskip("pytorch_fid.inception")
    from torchvision.models.inception import inception_v3
  import torch

  def fid_inception_v3():
    net = inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    for name, channels in [("Mixed_5b", (192, 32)), ("Mixed_5c", (256, 64)),
                           ("Mixed_5d", (288, 64))]:
      setattr(net, name, P.FIDInceptionA(*channels))
    for name, channels in [("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                           ("Mixed_6e", 192)]:
      setattr(net, name, P.FIDInceptionC(768, channels))
    net.Mixed_7b, net.Mixed_7c = P.FIDInceptionE_1(1280), P.FIDInceptionE_2(2048)
    return _load_random_weights(net, state)

  monkeypatch.setattr(P, "fid_inception_v3", fid_inception_v3)
  model = P.InceptionV3([P.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
  with torch.no_grad(), _one_torch_thread():
    expected = model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)[0]
  expected = expected.flatten(1).numpy()
  assert np.abs(expected).max() > 0.1
  np.testing.assert_allclose(reference, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_network_input_resizes_like_pytorch_interpolate():
  torch = pytest.importorskip("torch")
  import torch.nn.functional as F

  # Upsampling (Shapes' 32 px) and downsampling (COCO-sized), neither square.
  for shape in [(1, 24, 40, 3), (1, 333, 401, 3)]:
    images = np.random.default_rng(2).integers(0, 256, shape, np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    expected = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
    ours = np.asarray(inception.network_input(images))
    np.testing.assert_allclose(ours, expected.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def _save(state, path, drop=None, put=None):
  """The state dict as an .npz, less the key `drop`, with the arrays `put` added or replaced."""
  state = {k: v for k, v in state.items() if k != drop}
  state.update(put or {})
  np.savez(path, **state)
  return str(path)


def test_missing_key_is_an_input_error_naming_file_and_key(state, tmp_path):
  path = _save(state, tmp_path / "w.npz", drop="Mixed_6c.branch7x7_2.bn.running_var")
  with pytest.raises(InputError,
                     match=r"w\.npz: missing .*'Mixed_6c\.branch7x7_2\.bn\.running_var'"):
    inception.load_params(path)


def test_unexpected_key_is_an_input_error(state, tmp_path):
  path = _save(state, tmp_path / "w.npz", put={"fc.weight": np.zeros((1008, 2048), np.float32)})
  with pytest.raises(InputError, match=r"w\.npz: unexpected key 'fc\.weight'"):
    inception.load_params(path)


def test_wrong_shape_is_an_input_error(state, tmp_path):
  path = _save(state, tmp_path / "w.npz",
               put={"Conv2d_2a_3x3.conv.weight": np.zeros((32, 32, 3, 2), np.float32)})
  with pytest.raises(InputError, match=r"w\.npz: 'Conv2d_2a_3x3\.conv\.weight' has shape "
                                       r"\(32, 32, 3, 2\), expected \(32, 32, 3, 3\)"):
    inception.load_params(path)


@pytest.mark.parametrize("content", [b"not an archive", None])
def test_not_an_npz_is_an_input_error(tmp_path, content):
  path = tmp_path / "w.npz"
  if content is None:
    np.save(tmp_path / "w.npy", np.zeros(3))
    path = tmp_path / "w.npy"
  else:
    path.write_bytes(content)
  with pytest.raises(InputError, match=str(path.name)):
    inception.load_params(str(path))


def test_config_inception_needs_the_weights_field_before_any_work(tmp_path):
  with pytest.raises(InputError, match=r"--config\.eval\.inception_weights"):
    features.feature_extractor(configs.load("tiny", ["eval.fid_features=inception"]))
  missing = str(tmp_path / "nowhere.npz")
  config = configs.load("tiny", ["eval.fid_features=inception",
                                 f"eval.inception_weights={missing}"])
  with pytest.raises(InputError, match=r"--config\.eval\.inception_weights=.*nowhere\.npz"):
    features.feature_extractor(config)


def test_config_inception_extracts_from_the_weights_file(state, images, reference, tmp_path):
  path = str(tmp_path / "inception.npz")
  inception.save_npz(state, path)
  config = configs.load("tiny", ["eval.fid_features=inception", f"eval.inception_weights={path}"])
  np.testing.assert_array_equal(features.feature_extractor(config)(images), reference)
