"""GPTQ's layer output error by column order (none, static, dynamic act-order) on real activations.

A quick stand-in for the perplexity benchmark (seconds, not 20 minutes): for each Linear of a few
decoder layers of the bundled SmolLM2, record its input Hessian ``H`` on calibration text (pydoc topics,
the float model), quantize the weight with each ``--act-order`` mode, and report the relative output
error ``tr(D H D^T) / tr(W H W^T)`` with ``D = W - Q`` (what GPTQ minimizes), summed over the Linears.

    .venv/bin/python benchmarks/bench_act_order_error.py [--layers 0,10,20] [--group-size 64]
"""

from __future__ import annotations

import argparse

import torch

from qwenkit.checkpoint import load_model, open_checkpoint
from qwenkit.default_model import default_model_path
from qwenkit.generate import tokenizer_for
from qwenkit.quant import calibration_token_ids, gptq_quantize_weight
from qwenkit.quant.gptq import HessianAccumulator

MODES = ("none", "static", "dynamic")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="0,10,20")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--calib-samples", type=int, default=8)
    args = ap.parse_args()
    source = open_checkpoint(default_model_path())
    model, _ = load_model(source, dtype="float32", progress=False, dequantize=True)
    tok = tokenizer_for(source)
    windows = calibration_token_ids(
        tok.encode, args.calib_samples, 512, start_ids=tok.sequence_special_ids[0]
    )
    targets: dict[str, tuple[torch.nn.Linear, HessianAccumulator]] = {}
    hooks = []
    for index in map(int, args.layers.split(",")):
        for name, m in model.model.layers[index].named_modules():
            if isinstance(m, torch.nn.Linear):
                acc = HessianAccumulator(m.in_features, torch.device("cpu"))
                targets[f"{index}.{name}"] = (m, acc)
                hooks.append(m.register_forward_hook(lambda _m, a, _o, acc=acc: acc.add(a[0].detach())))
    with torch.no_grad():
        for w in windows:
            model(torch.tensor([w]))
    for h in hooks:
        h.remove()

    print(f"SmolLM2, int{args.bits} g{args.group_size}, {len(windows)} x 512 calibration tokens\n")
    print("| layer | " + " | ".join(MODES) + " |\n|---|" + "---|" * len(MODES))
    total = dict.fromkeys(MODES, 0.0)
    for name, (m, acc) in targets.items():
        W, H = m.weight.detach(), acc.hessian
        base = float(torch.trace(W @ H @ W.T))
        row = []
        for mode in MODES:
            q = gptq_quantize_weight(W, H, args.bits, args.group_size, act_order=mode).dequantize()
            D = W - q
            err = float(torch.trace(D @ H @ D.T)) / base
            total[mode] += err
            row.append(f"{err:.5f}")
        print(f"| {name} | " + " | ".join(row) + " |")
    ref = total["dynamic"]
    print(
        "| **sum** | " + " | ".join(f"**{total[m]:.4f}** ({total[m] / ref - 1:+.1%})" for m in MODES) + " |"
    )


if __name__ == "__main__":
    main()
