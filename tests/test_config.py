import json

import pytest

from mla_graph import MLAConfig, YarnScaling


@pytest.mark.parametrize("name, heads, hidden, q_lora", [
    ("deepseek-v2-lite", 16, 2048, None), ("deepseek-v2", 128, 5120, 1536),
    ("deepseek-v3", 128, 7168, 1536), ("deepseek-r1", 128, 7168, 1536), ("kimi-k2", 64, 7168, 1536)])
def test_presets_have_published_dimensions(name, heads, hidden, q_lora):
    c = MLAConfig.preset(name)
    assert (c.num_heads, c.hidden_size, c.q_lora_rank) == (heads, hidden, q_lora)
    assert (c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (512, 128, 64, 128)
    assert c.rope_scaling is not None


def test_v3_softmax_scale_matches_deepseek_formula():
    c = MLAConfig.preset("deepseek-v3")
    import math
    mscale = 0.1 * 1.0 * math.log(40) + 1.0
    assert c.softmax_scale == pytest.approx(192 ** -0.5 * mscale * mscale)


def test_unknown_preset_lists_known():
    with pytest.raises(ValueError, match="unknown preset 'gpt-2'.*deepseek-v3"):
        MLAConfig.preset("gpt-2")


def test_from_hf_dict_path_and_folder(tmp_path):
    hf = {"hidden_size": 2048, "num_attention_heads": 16, "q_lora_rank": None, "kv_lora_rank": 512,
          "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "rms_norm_eps": 1e-6,
          "rope_theta": 10000, "max_position_embeddings": 163840,
          "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                           "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}}
    want = MLAConfig.preset("deepseek-v2-lite")
    assert MLAConfig.from_hf(hf) == want
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert MLAConfig.from_hf(tmp_path / "config.json") == want
    assert MLAConfig.from_hf(str(tmp_path)) == want
    # transformers 5 writes rope_parameters with rope_type and rope_theta inside
    newer = dict(hf)
    rope = dict(newer.pop("rope_scaling"))
    rope["rope_type"] = rope.pop("type")
    newer.pop("rope_theta")
    newer["rope_parameters"] = {**rope, "rope_theta": 10000}
    assert MLAConfig.from_hf(newer) == want


def test_from_hf_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        MLAConfig.from_hf(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        MLAConfig.from_hf(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="lacks MLA field.*kv_lora_rank"):
        MLAConfig.from_hf({"hidden_size": 8, "num_attention_heads": 2})


BASE = dict(hidden_size=64, num_heads=4, q_lora_rank=32, kv_lora_rank=48, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=12)


@pytest.mark.parametrize("field, value, message", [
    ("hidden_size", 0, "hidden_size must be a positive int, got 0"),
    ("num_heads", -2, "num_heads must be a positive int, got -2"),
    ("q_lora_rank", 0, "q_lora_rank must be a positive int or None, got 0"),
    ("kv_lora_rank", 1.5, "kv_lora_rank must be a positive int, got 1.5"),
    ("qk_nope_head_dim", None, "qk_nope_head_dim must be a positive int, got None"),
    ("qk_rope_head_dim", 7, "qk_rope_head_dim must be even"),
    ("v_head_dim", True, "v_head_dim must be a positive int, got True"),
    ("rms_norm_eps", 0.0, "rms_norm_eps must be a float in \\(0, 1\\), got 0.0"),
    ("rope_theta", 1, "rope_theta must be a number > 1, got 1"),
    ("max_position_embeddings", 0, "max_position_embeddings must be a positive int, got 0"),
    ("rope_scaling", {"factor": 4}, "rope_scaling must be a YarnScaling or None"),
])
def test_each_invalid_field_is_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        MLAConfig(**{**BASE, field: value})


@pytest.mark.parametrize("field, value, message", [
    ("factor", 0.5, "rope_scaling.factor must be a number >= 1, got 0.5"),
    ("original_max_position_embeddings", 0, "rope_scaling.original_max_position_embeddings must be a positive int"),
    ("beta_fast", 0, "rope_scaling.beta_fast must be a number > 0, got 0"),
    ("beta_slow", 64, "beta_fast \\(32.0\\) must be >= beta_slow \\(64\\)"),
    ("mscale", -1, "rope_scaling.mscale must be a number >= 0, got -1"),
    ("mscale_all_dim", "x", "rope_scaling.mscale_all_dim must be a number >= 0, got 'x'"),
])
def test_each_invalid_yarn_field_is_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        MLAConfig(**BASE, rope_scaling=YarnScaling(**{field: value}))


def test_tp_size_must_divide_heads():
    c = MLAConfig(**BASE)
    assert c.heads_per_rank(2) == 2
    with pytest.raises(ValueError, match="num_heads=4 is not divisible by tp_size=3"):
        c.heads_per_rank(3)
