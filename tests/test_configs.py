"""Config presets and command-line overrides."""

import pytest

from cm3leon_jax import configs
from cm3leon_jax.configs.base import tokens_per_image
from cm3leon_jax.errors import InputError

SECTIONS = ("vocab", "text_tokenizer", "vq", "data", "retrieval", "model", "optimizer", "train",
            "mesh", "decoding")


@pytest.mark.parametrize("preset", configs.PRESETS)
def test_every_preset_loads_with_every_section(preset):
  config = configs.load(preset)
  assert config.name == preset
  for section in SECTIONS:
    assert section in config


@pytest.mark.parametrize("preset, layers, d_model, lr, tokens", [
    ("cm3leon_350m", 24, 1024, 6e-4, 1.4e12),
    ("cm3leon_760m", 24, 1536, 5e-4, 1.9e12),
    ("cm3leon_7b", 32, 4096, 1.2e-4, 2.4e12),
])
def test_paper_presets_carry_reference_section_4(preset, layers, d_model, lr, tokens):
  c = configs.load(preset)
  assert (c.model.num_layers, c.model.d_model, c.model.seq_len) == (layers, d_model, 4096)
  assert c.optimizer.peak_lr == lr and c.optimizer.warmup_steps == 1500
  assert c.train.batch_size * c.model.seq_len == 8 * 2**20  # 8M-token batches
  assert abs(c.train.steps * 8 * 2**20 - tokens) / tokens < 1e-4
  assert c.model.pos_init_std == 0.0002 and c.model.init_std == 0.006
  assert c.vocab.text_size == 56320 and c.vq.codebook_size == 8192
  assert tokens_per_image(c) == 1024
  assert c.model.num_heads * c.model.head_dim == d_model


def test_overrides_are_parsed_to_the_field_type():
  c = configs.load("tiny", ["model.num_layers=4", "--config.optimizer.peak_lr=1e-3",
                            "model.qk_norm=true", "model.activation=gelu",
                            "mesh.axis_rules=(('batch', 'data'),)"])
  assert c.model.num_layers == 4 and isinstance(c.model.num_layers, int)
  assert c.optimizer.peak_lr == 1e-3
  assert c.model.qk_norm is True
  assert c.model.activation == "gelu"
  assert c.mesh.axis_rules == (("batch", "data"),)


@pytest.mark.parametrize("override, message", [
    ("model.num_layrs=3", r"unknown field 'num_layrs' in model \(did you mean 'num_layers'\?\)"),
    ("modle.num_layers=3", r"unknown field 'modle' in the config \(did you mean 'model'\?\)"),
    ("model.num_layers=four", r"model.num_layers=four: expected int"),
    ("model.qk_norm=maybe", r"expected bool"),
    ("model=3", r"is a section"),
    ("model.num_layers", r"expected --config.<field>=<value>"),
    ("model.activation=tanh", r"model.activation='tanh': expected one of"),
    ("vq.image_size=30", r"not divisible by vq.downsample"),
    ("vq.batch_size=0", r"vq.batch_size=0: must be >= 1"),
    ("retrieval.steps=-1", r"retrieval.steps=-1: must be >= 1"),
])
def test_bad_overrides_are_one_line_errors(override, message):
  with pytest.raises(InputError, match=message) as error:
    configs.load("tiny", [override])
  assert "\n" not in str(error.value)


def test_unknown_preset_suggests_the_closest():
  with pytest.raises(InputError, match="did you mean 'quickstart'"):
    configs.load("quickstrat")


def test_loaded_config_is_locked():
  c = configs.load("tiny")
  with pytest.raises(AttributeError):
    c.model.new_field = 1


def test_config_file_with_arg(tmp_path):
  path = tmp_path / "my.py"
  path.write_text("from cm3leon_jax.configs import tiny\n"
                  "def get_config(arg):\n  c = tiny.get_config()\n  c.name = arg\n  return c\n")
  assert configs.load(f"{path}:mine").name == "mine"
