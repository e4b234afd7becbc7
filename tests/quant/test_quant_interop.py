"""Other readers load what ``qwenkit quantize`` writes: transformers + optimum + GPTQModel (CPU kernels).

The source is a small random Qwen2 in the exact Hugging Face layout whose widths (192) are not multiples
of the default group size (128), so this also checks the group-size fallback end to end: the file has
whole groups of 64 and the other reader builds its layers from the config alone. For each output
(4-bit static act-order, dynamic act-order and none; 8-bit) the reader's logits equal qwenkit's on the
same checkpoint within bfloat16 rounding (both sides run their int4 CPU kernels on bfloat16
activations) and greedy generation gives the same tokens on fixed prompts.

GPTQModel is installed by ``make setup`` (``pip install --no-deps``: its own requirements pin numpy and
pull datasets/torchao, none of which loading needs).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from factories import hf_model, qwen3_tokenizer_dir
from safetensors.torch import load_file

from qwenkit.cli import main
from qwenkit.engine import SamplingParams
from qwenkit.generate import LLM

WIDTH, FFN = 192, 384  # 192 % 128 != 0: the default group size must fall back to 64
CALIB_TEXT = "The quick brown fox jumps over the lazy dog. " * 40 + "def f(x):\n    return x * 2\n" * 20
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]
NEW_TOKENS = 8
IDS = torch.randint(0, 151936, (3, 12), generator=torch.Generator().manual_seed(0))
BF16_ULPS = 4  # logits may differ by this many bfloat16 steps of the largest logit


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = tmp_path_factory.mktemp("interop") / "src"
    hf_model(
        "qwen2",
        vocab_size=151936,
        hidden_size=WIDTH,
        intermediate_size=FFN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(qwen3_tokenizer_dir() / name, path / name)
    (path.parent / "calib.txt").write_text(CALIB_TEXT)
    return path


def _transformers_model(path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu")
    model.generation_config.eos_token_id = None  # generate exactly NEW_TOKENS, as ignore_eos does
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("bits", "act_order"), [(4, "static"), (4, "none"), (4, "dynamic"), (8, "static")], ids=str
)
def test_transformers_gptqmodel_load_qwenkit_output(
    src, tmp_path, capsys, monkeypatch, bits, act_order
) -> None:
    # This checks what the files mean, so qwenkit runs PyTorch's kernels here (bf16 activations, like
    # GPTQModel's); its AVX-512 kernels round activations to int8 and are checked in test_quant_kernels.
    monkeypatch.setenv("QWENKIT_KERNELS", "torch")
    out = tmp_path / "q"
    calib = ["--calib", str(src.parent / "calib.txt"), "--calib-samples", "4", "--seq-len", "32"]
    args = ["quantize", str(src), str(out), "-q", "--bits", str(bits), "--act-order", act_order, *calib]
    assert main(args) == 0
    assert "using 64, the largest size that tiles every quantized layer" in capsys.readouterr().err

    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qcfg["bits"], qcfg["group_size"], qcfg["desc_act"]) == (bits, 64, act_order == "dynamic")
    tensors = load_file(out / "model.safetensors")
    scales = {k: t for k, t in tensors.items() if k.endswith(".scales")}
    assert len(scales) == 2 * 7
    for name, t in scales.items():  # whole groups only: in_features / 64 rows in every layer
        in_features = FFN if "down_proj" in name else WIDTH
        assert t.shape[0] == in_features // 64, name

    theirs = _transformers_model(out)
    layer = theirs.model.layers[0].mlp.down_proj
    assert type(layer).__module__.startswith("gptqmodel.nn_modules.qlinear"), type(layer)
    llm = LLM.load(out, dtype="float32", progress=False)
    with torch.no_grad():
        want, got = llm.model(IDS).float(), theirs(IDS).logits.float()
    tol = BF16_ULPS * 2**-8 * float(want.abs().max())
    assert float((got - want).abs().max()) <= tol, (float((got - want).abs().max()), tol)

    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for completion in llm.generate(PROMPTS, params):
        ids = torch.tensor([completion.prompt_ids])
        with torch.no_grad():
            seq = theirs.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        assert completion.token_ids == seq[0, ids.shape[1] :].tolist(), completion.prompt_ids
