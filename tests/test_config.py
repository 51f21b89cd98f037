"""config.json of every published revision reads into the same model the reference builds."""

from __future__ import annotations

import copy
import json

import pytest
from checkpoints import reference_dir
from mlx.utils import tree_flatten

from mlx_lfm2vl import Lfm2VlError
from mlx_lfm2vl.config import ModelConfig
from mlx_lfm2vl.models.lfm2_vl import Lfm2VlModel

# Parameter counts measured with transformers 5.23 on these configs
# (tests/data/reference/SOURCES.md).
PUBLISHED = {
    "LFM2-VL-450M": dict(params=450_822_656, ff_dim=4608, vision_layers=12, hidden=1024),
    "LFM2-VL-1.6B": dict(params=1_584_804_000, ff_dim=8192, vision_layers=26, hidden=2048),
    "LFM2-VL-3B": dict(params=2_998_975_216, ff_dim=10752, vision_layers=27, hidden=2048),
    "LFM2.5-VL-1.6B": dict(params=1_596_625_904, ff_dim=8192, vision_layers=27, hidden=2048),
}


def published(name: str) -> dict:
    return json.loads((reference_dir(name) / "config.json").read_text())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_config_builds_the_reference_parameter_count(name):
    config = ModelConfig.from_dict(published(name))
    expected = PUBLISHED[name]
    assert config.text.ff_dim == expected["ff_dim"]
    assert config.text.hidden_size == expected["hidden"]
    assert config.vision.num_hidden_layers == expected["vision_layers"]
    # Building the MLX model only creates lazy arrays; counting shapes costs no memory.
    model = Lfm2VlModel(config)
    count = sum(p.size for _, p in tree_flatten(model.parameters()))
    assert count == expected["params"]


def test_aug_2025_remote_code_config_reads_like_the_current_one():
    old = ModelConfig.from_dict(
        json.loads(
            (reference_dir("LFM2-VL-450M") / "rev-2025-08_remote-code/config.json").read_text()
        )
    )
    new = ModelConfig.from_dict(published("LFM2-VL-450M"))
    assert old.text == new.text
    assert old.vision == new.vision
    assert old.image_token_id == new.image_token_id == 396


def test_lfm2_5_fields_rope_parameters_and_projector_without_layernorm():
    config = ModelConfig.from_dict(published("LFM2.5-VL-1.6B"))
    assert config.text.rope_theta == 1_000_000.0
    assert config.projector_use_layernorm is False
    assert config.projector_hidden_size == 2048
    # LFM2-VL configs never set it: the reference default (a projector LayerNorm) applies.
    assert ModelConfig.from_dict(published("LFM2-VL-1.6B")).projector_use_layernorm is True


def test_block_dim_is_derived_from_hidden_size_when_absent():
    raw = published("LFM2-VL-1.6B")
    for key in ("block_dim", "conv_dim", "conv_dim_out"):
        raw["text_config"].pop(key)
    assert ModelConfig.from_dict(raw).text.hidden_size == 2048


def test_image_token_id_comes_from_the_config():
    raw = published("LFM2-VL-3B")
    raw["image_token_id"] = 124907
    assert ModelConfig.from_dict(raw).image_token_id == 124907
    raw = published("LFM2-VL-3B")
    del raw["image_token_id"]
    raw["image_token_index"] = 1234
    assert ModelConfig.from_dict(raw).image_token_id == 1234


def test_block_ff_dim_wins_over_intermediate_size_as_in_the_reference():
    raw = published("LFM2-VL-450M")
    raw["text_config"]["intermediate_size"] = 1024  # block_ff_dim stays 6656
    assert ModelConfig.from_dict(raw).text.ff_dim == 4608


def test_full_attn_idxs_spelling_gives_the_same_layer_types():
    raw = published("LFM2-VL-450M")
    text = copy.deepcopy(raw["text_config"])
    expected = tuple(text.pop("layer_types"))
    text["full_attn_idxs"] = [2, 5, 8, 10, 12, 14]
    raw["text_config"] = text
    assert ModelConfig.from_dict(raw).text.layer_types == expected


def test_hyphenated_model_type_is_accepted_and_unknown_types_fail_clearly():
    raw = published("LFM2-VL-450M")
    raw["model_type"] = "lfm2-vl"
    assert ModelConfig.from_dict(raw).text.num_hidden_layers == 16
    raw["model_type"] = "llava"
    with pytest.raises(Lfm2VlError, match="not an LFM2-VL model"):
        ModelConfig.from_dict(raw)


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "relu", None])
def test_projector_activation_other_than_gelu_fails_when_the_config_is_read(act):
    # The projector computes exact GELU whatever the config says; any other value would be
    # ignored silently, so it is refused before a model is built.
    raw = published("LFM2-VL-450M")
    assert ModelConfig.from_dict(raw).projector_hidden_act == "gelu"
    raw["projector_hidden_act"] = act
    with pytest.raises(Lfm2VlError, match=f"projector_hidden_act {act!r} is not supported"):
        ModelConfig.from_dict(raw)


def test_missing_or_broken_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(Lfm2VlError, match="config.json"):
        ModelConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(Lfm2VlError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path / "config.json")
