"""Config: the published Qwen sizes come out exactly (parameter counts checked against real index files)."""

from __future__ import annotations

import math
import re

import pytest

from qwenkit.config import ModelConfig
from qwenkit.errors import ConfigError

QWEN_7B = {
    "model_type": "qwen",
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "intermediate_size": 22016,
    "kv_channels": 128,
    "rotary_pct": 1.0,
    "rotary_emb_base": 10000,
    "seq_length": 8192,
    "max_position_embeddings": 32768,
    "layer_norm_epsilon": 1e-6,
    "vocab_size": 151936,
    "no_bias": True,
    "use_dynamic_ntk": True,
    "use_logn_attn": True,
    "tie_word_embeddings": False,
}


QWEN3_SMALL = {
    "model_type": "qwen3",
    "vocab_size": 151936,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 131072,
}


def test_qwen_7b_parameter_count_matches_its_index_file():
    cfg = ModelConfig.from_hf(QWEN_7B)
    # model.safetensors.index.json total_size 15,442,649,088 bytes of 2-byte floats (qwen_facts §1.2)
    assert cfg.num_parameters * 2 == 15_442_649_088
    assert (cfg.intermediate_size, cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings) == (
        11008,
        128,
        1e4,
        8192,
    )


def test_qwen_72b_parameter_count_and_base():
    cfg = ModelConfig.from_hf(
        {
            **QWEN_7B,
            "hidden_size": 8192,
            "num_attention_heads": 64,
            "num_hidden_layers": 80,
            "intermediate_size": 49152,
            "rotary_emb_base": 1000000,
            "vocab_size": 152064,
            "use_dynamic_ntk": False,
            "use_logn_attn": False,
        }
    )
    assert cfg.num_parameters * 2 == 144_575_840_256
    assert cfg.rope_theta == 1e6 and cfg.max_context == 8192


def test_aug_2023_v1_spellings():
    old = {
        "model_type": "qwen",
        "n_embd": 4096,
        "n_head": 32,
        "n_layer": 32,
        "ffn_hidden_size": 22016,
        "kv_channels": 128,
        "seq_length": 2048,
        "padded_vocab_size": 151936,
        "vocab_size": 151936,
    }
    cfg = ModelConfig.from_hf(old)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.max_position_embeddings) == (4096, 11008, 2048)


def test_a_v1_seq_length_below_2_is_refused():
    """seq_length is the base of v1's LogN logarithms and the divisor of its NTK alpha: 0 loaded and then
    failed on the first request with a ZeroDivisionError traceback, 1 generated from infinite queries."""
    import pytest

    from qwenkit.errors import ConfigError

    for bad in (0, 1, -8):
        with pytest.raises(ConfigError, match=f"^Qwen v1 seq_length {bad} must be at least 2 "):
            ModelConfig.from_hf({**QWEN_7B, "seq_length": bad})
    smallest = ModelConfig.from_hf({**QWEN_7B, "seq_length": 2})
    assert (smallest.max_position_embeddings, smallest.max_context) == (2, 32768)


def test_a_size_that_is_zero_or_negative_is_refused_by_name():
    """0 heads divided by zero; -4 kv heads, a negative head_dim or a window of 0 loaded, and the engine
    then refused every prompt or the first forward failed. (0 kv heads or head_dim means "derive it".)"""
    import pytest

    from qwenkit.errors import ConfigError

    for key, bad in [
        ("num_attention_heads", 0),
        ("num_key_value_heads", -4),
        ("head_dim", -128),
        ("max_position_embeddings", 0),
        ("max_position_embeddings", -1),
    ]:
        with pytest.raises(ConfigError, match=f"^config value {key}={bad} must be positive$"):
            ModelConfig.from_hf({**QWEN3_SMALL, key: bad})
    derived = ModelConfig.from_hf({**QWEN3_SMALL, "num_key_value_heads": 0, "head_dim": 0})
    assert (derived.num_key_value_heads, derived.head_dim) == (16, 128)  # Qwen3Config's own default
    # Qwen v1's reader derives kv_channels by dividing by the heads: 0 was a ZeroDivisionError traceback
    for key in ("num_attention_heads", "n_head"):
        v1 = {k: v for k, v in QWEN_7B.items() if k != "kv_channels"} | {key: 0}
        if key == "n_head":
            del v1["num_attention_heads"]
        with pytest.raises(ConfigError, match="^config value num_attention_heads=0 must be positive$"):
            ModelConfig.from_hf(v1)


def test_a_huge_size_or_a_rope_scaling_that_is_no_object_is_refused_by_name():
    """num_hidden_layers 1e30 (JSON's float, a whole number) hung while the model was built; rope_scaling
    5 was "'int' object is not iterable", naming no key."""
    import pytest

    from qwenkit.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf({**QWEN3_SMALL, "num_hidden_layers": 1e30})
    assert str(e.value) == "config.json: num_hidden_layers is 1e+30, past any model's (2,147,483,647 at most)"
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf({**QWEN3_SMALL, "rope_scaling": 5})
    assert str(e.value) == "config.json: rope_scaling must be an object or null, not 5"
    assert ModelConfig.from_hf({**QWEN3_SMALL, "rope_scaling": None}).rope_scaling is None


def test_qwen3_explicit_head_dim_and_gqa():
    cfg = ModelConfig.from_hf({**QWEN3_SMALL, "tie_word_embeddings": True, "rope_theta": 1000000})
    assert cfg.head_dim == 128 and cfg.qk_norm and not cfg.qkv_bias
    assert cfg.kv_cache_bytes_per_token(2) == 2 * 28 * 8 * 128 * 2


def test_yarn_takes_its_factor_or_the_context_ratio_and_refuses_neither():
    import pytest

    from qwenkit.errors import ConfigError

    given = ModelConfig.from_hf({**QWEN3_SMALL, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    assert given.rope_scaling.factor == 4.0 and given.rope_scaling.original_max_position_embeddings == 131072
    ratio = {"rope_type": "yarn", "original_max_position_embeddings": 32768}
    assert ModelConfig.from_hf({**QWEN3_SMALL, "rope_scaling": ratio}).rope_scaling.factor == 4.0
    with pytest.raises(ConfigError, match="rope_scaling type yarn needs a factor"):
        ModelConfig.from_hf({**QWEN3_SMALL, "rope_scaling": {"rope_type": "yarn"}})  # was a silent 1.0
    for bad, words in ((0, "factor must be positive, not 0"), ("4", "needs factor (a number, not '4')")):
        with pytest.raises(ConfigError, match=re.escape(words)):  # was a math domain error or a TypeError
            ModelConfig.from_hf({**QWEN3_SMALL, "rope_scaling": {"rope_type": "yarn", "factor": bad}})


def test_a_rope_scaling_original_window_that_is_no_positive_size_is_refused_by_name():
    """YaRN's ratio divided by an original window of 0 (a ZeroDivisionError traceback); beside a factor,
    0 or -1 loaded and the model's build failed on math.log ("math domain error"); llama3 ran a negative
    one with every frequency divided by the factor, 2.5 as 2; null or text named no key."""
    import pytest

    from qwenkit.errors import ConfigError

    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    for scaling in ({"rope_type": "yarn"}, {"rope_type": "yarn", "factor": 4.0}, llama3):
        words = f"rope_scaling type {scaling['rope_type']} needs original_max_position_embeddings"
        for bad in (0, -1, 2.5, None, "8192", True):
            rope = {**scaling, "original_max_position_embeddings": bad}
            with pytest.raises(ConfigError, match=f"^{words} .*, not {re.escape(repr(bad))}\\)$"):
                ModelConfig.from_hf({**QWEN3_SMALL, "rope_scaling": rope})
        for bad in (-1, 2.5, "8192"):  # the top-level key, which wins (null or 0 there: not given)
            with pytest.raises(ConfigError, match=f"^{words} .*, not {re.escape(repr(bad))}\\)$"):
                ModelConfig.from_hf(
                    {**QWEN3_SMALL, "rope_scaling": scaling, "original_max_position_embeddings": bad}
                )
    whole = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768.0}
    scaling = ModelConfig.from_hf({**QWEN3_SMALL, "rope_scaling": whole}).rope_scaling
    assert scaling.original_max_position_embeddings == 32768 and scaling.factor == 4.0


def test_keys_transformers_reads_otherwise_are_refused_by_name():
    """Each was read differently from transformers, silently: the logits differed."""
    import pytest

    from qwenkit.errors import ConfigError

    qwen2 = {**QWEN3_SMALL, "model_type": "qwen2"}
    # transformers' qwen2/qwen3/llama rotate the whole head whatever partial_rotary_factor says; qwenkit
    # rotated a part of it (logits 5e-3 apart on a tiny qwen2, 0.26 on a qwen3)
    for family in ("qwen2", "qwen3", "llama", "qwen3_moe"):
        with pytest.raises(ConfigError, match=f"partial_rotary_factor=0.5 is not supported for {family}"):
            ModelConfig.from_hf({**qwen2, "model_type": family, "partial_rotary_factor": 0.5})
    nested = {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25}
    with pytest.raises(ConfigError, match="partial_rotary_factor=0.25"):
        ModelConfig.from_hf({**qwen2, "rope_parameters": nested})
    assert ModelConfig.from_hf({**qwen2, "partial_rotary_factor": 1.0}).rotary_dim == 128
    # Qwen's documented YaRN rope_scaling added to a config.json transformers 5 wrote (rope_parameters of
    # type default): transformers runs YaRN (at base 10000), qwenkit ran no YaRN
    v5 = {**qwen2, "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}}
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    with pytest.raises(
        ConfigError, match="rope_scaling and rope_parameters disagree .rope_type 'yarn' against"
    ):
        ModelConfig.from_hf({**v5, "rope_scaling": yarn})
    same = {"rope_type": "yarn", "rope_theta": 1e6, **yarn}
    assert ModelConfig.from_hf({**v5, "rope_parameters": same, "rope_scaling": yarn}).rope_scaling.factor == 4
    # sliding-window layers named in layer_types (as transformers 5 writes them) are not run as full ones
    with pytest.raises(ConfigError, match=r"layer_types makes layer\(s\) 1 sliding-window attention"):
        ModelConfig.from_hf({**qwen2, "layer_types": ["full_attention", "sliding_attention"]})
    # use_sliding_window=true slides the layers from max_window_layers on (Qwen2-MoE: the even ones below it)
    sliding = {"use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 20}
    with pytest.raises(ConfigError, match=r"use_sliding_window=true makes layer\(s\) 20-27 sliding"):
        ModelConfig.from_hf({**qwen2, **sliding})
    with pytest.raises(ConfigError, match=r"layer\(s\) 0, 2, 4, 6, 8, 10, 12, 14, 16, 18 sliding"):
        ModelConfig.from_hf({**qwen2, **sliding, "model_type": "qwen2_moe"})
    assert ModelConfig.from_hf({**qwen2, "layer_types": ["full_attention"] * 28}).family == "qwen2"


def test_a_number_of_the_wrong_type_is_named():
    """null, text or a list where a number belongs names its key (it said only "float() argument must be a
    string or a real number, not 'NoneType'")."""
    import pytest

    from qwenkit.errors import ConfigError

    cases = [
        ("rms_norm_eps", None, "rms_norm_eps is null; give a number or remove the key"),
        ("max_position_embeddings", None, "max_position_embeddings is null; give a number or remove the key"),
        ("hidden_size", "wide", "hidden_size must be a whole number, not 'wide'"),
        ("rope_theta", [1], "rope_theta must be a number, not [1]"),
        ("rms_norm_eps", "1e-6", "rms_norm_eps must be a number, not '1e-6'"),
    ]
    for key, value, words in cases:
        with pytest.raises(ConfigError, match=f"^config.json: {re.escape(words)}$"):
            ModelConfig.from_hf({**QWEN3_SMALL, key: value})
    assert ModelConfig.from_hf({**QWEN3_SMALL, "num_key_value_heads": None}).num_key_value_heads == 16
    v1 = {"model_type": "qwen", "vocab_size": 64, "hidden_size": 32, "num_attention_heads": 4}
    v1 |= {"num_hidden_layers": 1, "intermediate_size": 64, "layer_norm_epsilon": "tiny"}
    with pytest.raises(ConfigError, match="layer_norm_epsilon must be a number, not 'tiny'"):
        ModelConfig.from_hf(v1)


LLAMA31_8B = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
}


def test_llama3_and_linear_rope_scaling_read_as_transformers_standardizes_them():
    """Llama 3.1/3.2 (rope_type llama3) and linear interpolation were refused ("supports default and
    yarn"). Their original window comes from rope_scaling, a top-level key, or max_position_embeddings."""
    from qwenkit.rope_scaling import LinearScaling, Llama3Scaling

    cfg = ModelConfig.from_hf(LLAMA31_8B)
    assert cfg.rope_scaling == Llama3Scaling(8.0, 1.0, 4.0, 8192) and cfg.rope_theta == 5e5
    assert cfg.max_context == 131072  # Llama 3.1 states the stretched window itself
    v5 = {k: v for k, v in LLAMA31_8B.items() if k not in ("rope_scaling", "rope_theta")}
    v5["rope_parameters"] = {**LLAMA31_8B["rope_scaling"], "rope_theta": 500000.0}
    assert ModelConfig.from_hf(v5) == cfg
    unstated = {**LLAMA31_8B, "rope_scaling": {**LLAMA31_8B["rope_scaling"]}}
    del unstated["rope_scaling"]["original_max_position_embeddings"]
    assert ModelConfig.from_hf(unstated).rope_scaling.original_max_position_embeddings == 131072
    top = {**unstated, "original_max_position_embeddings": 4096}
    assert ModelConfig.from_hf(top).rope_scaling.original_max_position_embeddings == 4096
    # linear keeps max_position_embeddings at the trained window (vicuna-7b-v1.5-16k: 4096 x 4)
    linear = {
        **LLAMA31_8B,
        "max_position_embeddings": 4096,
        "rope_scaling": {"type": "linear", "factor": 4.0},
    }
    cfg = ModelConfig.from_hf(linear)
    assert cfg.rope_scaling == LinearScaling(4.0) and cfg.max_context == 16384


def test_bad_llama3_and_linear_rope_scaling_is_refused_by_name():
    import pytest

    from qwenkit.errors import ConfigError

    llama3 = LLAMA31_8B["rope_scaling"]
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        params = {k: v for k, v in llama3.items() if k != key}
        with pytest.raises(ConfigError, match=f"^rope_scaling type llama3 needs {key} .a number.$"):
            ModelConfig.from_hf({**LLAMA31_8B, "rope_scaling": params})
    with pytest.raises(
        ConfigError, match="^rope_scaling type llama3 needs low_freq_factor .a number, not '1'.$"
    ):
        ModelConfig.from_hf({**LLAMA31_8B, "rope_scaling": {**llama3, "low_freq_factor": "1"}})
    with pytest.raises(ConfigError, match=r"needs high_freq_factor \(1\) above low_freq_factor \(1\)"):
        ModelConfig.from_hf({**LLAMA31_8B, "rope_scaling": {**llama3, "high_freq_factor": 1.0}})
    with pytest.raises(ConfigError, match="^rope_scaling type linear needs factor .a number.$"):
        ModelConfig.from_hf({**LLAMA31_8B, "rope_scaling": {"rope_type": "linear"}})
    with pytest.raises(ConfigError, match="^rope_scaling factor must be positive, not 0$"):
        ModelConfig.from_hf(
            {**LLAMA31_8B, "rope_scaling": None, "rope_parameters": {"type": "linear", "factor": 0}}
        )
    # transformers' dynamic NTK follows the batch's longest row step by step: refused, saying why
    with pytest.raises(
        ConfigError, match="^unsupported rope_scaling type 'dynamic': transformers recomputes"
    ):
        ModelConfig.from_hf({**LLAMA31_8B, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    with pytest.raises(ConfigError, match="qwenkit supports default, linear, llama3, yarn$"):
        ModelConfig.from_hf({**LLAMA31_8B, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}})


@pytest.mark.parametrize(
    "key, bad",
    [("attention_factor", "0.8"), ("attention_factor", True), ("mscale", "0.707"), ("mscale_all_dim", [1]),
     ("beta_fast", "16"), ("beta_slow", False), ("truncate", "false"), ("truncate", 0)],
)  # fmt: skip
def test_a_yarn_key_of_the_wrong_type_is_refused_by_name(key, bad):
    """attention_factor or mscale as text loaded, then building the model failed with a bare TypeError
    ("can't multiply sequence by non-int of type 'float'"); beta_fast "16" ran as 16 where transformers
    fails, and truncate "false" ran truncated. Null is a number's default, as in transformers (and a null
    truncate, falsy there, does not truncate)."""
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf({**QWEN3_SMALL, "rope_scaling": {**yarn, key: bad}})
    kind = "true or false" if key == "truncate" else "a number"
    assert str(e.value) == f"rope_scaling type yarn: {key} must be {kind} or null, not {bad!r}"
    nulls = {k: None for k in ("attention_factor", "mscale", "mscale_all_dim", "beta_fast", "beta_slow")}
    read = ModelConfig.from_hf({**QWEN3_SMALL, "rope_scaling": {**yarn, **nulls}}).rope_scaling
    assert (read.beta_fast, read.beta_slow, read.cos_sin_scale) == (32.0, 1.0, 0.1 * math.log(4.0) + 1)
    whole = {**yarn, "attention_factor": 1, "mscale": 1, "mscale_all_dim": 1, "beta_fast": 16}
    read = ModelConfig.from_hf({**QWEN3_SMALL, "rope_scaling": whole}).rope_scaling
    assert (read.attention_factor, read.beta_fast, read.cos_sin_scale) == (1.0, 16.0, 1.0)
    unset = {**yarn, "truncate": None}
    assert ModelConfig.from_hf({**QWEN3_SMALL, "rope_scaling": unset}).rope_scaling.truncate is False


@pytest.mark.parametrize("bad", [0, 0.0, -1.1])
def test_a_yarn_attention_factor_of_zero_or_below_is_refused_by_name(bad):
    """attention_factor multiplies cos and sin, so q and k both: every attention score by its square. 0
    made each score 0 (attention blind to content) and -1.1 ran as 1.1; both loaded without a word
    (transformers warns that the field "must be a float greater than 0" and runs it). Refused in one line,
    as a factor of 0 or below is; a positive one, and null (derived from the factor), still run."""
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf({**QWEN3_SMALL, "rope_scaling": {**yarn, "attention_factor": bad}})
    assert str(e.value) == (
        f"rope_scaling type yarn: attention_factor must be above 0 (it scales cos and sin), not {bad!r}; "
        "give null to derive it from the factor"
    )
    small = ModelConfig.from_hf({**QWEN3_SMALL, "rope_scaling": {**yarn, "attention_factor": 0.5}})
    assert small.rope_scaling.cos_sin_scale == 0.5
