"""`--target-modules`: every name must adapt some layer. Matching by suffix skips a name that matches
nothing (peft does the same), so a misspelt name once trained fewer layers than asked, silently."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from qwenkit.cli import main as cli_main


def write_chat(path, n=4):
    rows = [
        {"messages": [{"role": "user", "content": f"{i}+1?"}, {"role": "assistant", "content": f"{i + 1}"}]}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--target-modules", "q_proj,v_prj"],
            "--target-modules: no layer matches v_prj; this model's linear layers: down_proj, gate_proj, "
            "k_proj, lm_head, o_proj, q_proj, up_proj, v_proj",
        ),
        (
            ["--target-modules", "gate"],
            "--target-modules: no layer matches gate;",
        ),  # a router: dense has none
        (["--target-modules", "v_proj,qproj", "--lora-layers", "1"], "no layer matches qproj in layers [0];"),
        (["--target-modules", ""], "--target-modules names no layer (got ''); leave it out for the default"),
        (["--target-modules", " , "], "--target-modules names no layer (got ' , ');"),
    ],
)
def test_a_target_that_matches_no_layer_is_refused(extra, message, tiny_chat_model, tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["finetune", str(tiny_chat_model), str(write_chat(tmp_path / "d.jsonl")), str(out), *extra]
    assert cli_main([*argv, "--max-steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("error: ")
    assert not out.exists() and not (tmp_path / "o.training").exists()


def test_every_named_target_is_adapted(tiny_chat_model, tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["finetune", str(tiny_chat_model), str(write_chat(tmp_path / "d.jsonl")), str(out)]
    assert cli_main([*argv, "--target-modules", "v_proj,lm_head", "--max-steps", "1", "--no-progress"]) == 0
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    modules = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in keys}
    assert modules == {"model.layers.0.self_attn.v_proj", "lm_head"}
