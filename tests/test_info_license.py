"""``qwenkit info``'s license line for Qwen2.5's own agreements (2024-09-19). Their texts name no
"Tongyi Qianwen", so Qwen2.5-3B's research license (non-commercial) showed as "custom: see LICENSE in
the model directory", and a card's ``license: other`` / ``license_name: qwen-research`` as "other"."""

from __future__ import annotations

import pytest
from factories import hf_model, save_hf

from qwenkit.cli import main

# the opening lines of the LICENSE files Qwen2.5-3B-Instruct and Qwen2.5-72B-Instruct ship
RESEARCH = (
    "Qwen RESEARCH LICENSE AGREEMENT\n\nQwen RESEARCH LICENSE AGREEMENT Release Date: September 19, 2024\n\n"
    "By clicking to agree or by using or distributing any portion or element of the Qwen Materials, ...\n"
    '    i. "Non-Commercial" shall mean for research or evaluation purposes only.\n'
)
QWEN = (
    "Qwen LICENSE AGREEMENT\n\nQwen LICENSE AGREEMENT Release Date: September 19, 2024\n\n"
    "By clicking to agree or by using or distributing any portion or element of the Qwen Materials, ...\n"
)
RESEARCH_LINE = (
    "qwen-research: Qwen Research License: research and evaluation only (non-commercial); commercial use "
    "needs a separate license from Alibaba Cloud"
)
QWEN_LINE = (
    "qwen: Qwen License: free for commercial use by products or services with fewer than 100 million "
    "monthly active users; above that, a separate commercial license from Alibaba Cloud is required"
)
TONGYI_LINE = (
    "tongyi-qianwen: Tongyi Qianwen License: free for commercial use by products or services with fewer "
    "than 100 million monthly active users; above that, a separate commercial license from Alibaba Cloud "
    "is required"
)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_hf(hf_model("qwen2"), tmp_path_factory.mktemp("license") / "m")


def _license_line(path, capsys) -> str:
    assert main(["info", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    return lines[lines.index("license:") + 1].strip()


@pytest.mark.parametrize(
    ("name", "text", "shown"),
    [
        ("LICENSE", RESEARCH, f"{RESEARCH_LINE} (from LICENSE)"),
        ("LICENSE", QWEN, f"{QWEN_LINE} (from LICENSE)"),
        # the Qwen1.5 agreement's title holds "Qwen LICENSE AGREEMENT" too: still Tongyi Qianwen's
        ("LICENSE", "Tongyi Qianwen LICENSE AGREEMENT\n\nTongyi Qianwen Release Date: August 3, 2023\n",
         f"{TONGYI_LINE} (from LICENSE)"),
        ("README.md", "---\nlicense: other\nlicense_name: qwen-research\nlicense_link: https://x/LICENSE\n---\n",
         f"{RESEARCH_LINE} (from README.md)"),
        ("README.md", '---\nlicense: other\nlicense_name: "qwen"\n---\n', f"{QWEN_LINE} (from README.md)"),
        ("README.md", "---\nlicense: apache-2.0\nlicense_name: qwen\n---\n",  # license_name only with other
         "apache-2.0: Apache License 2.0: commercial use, modification and redistribution allowed, with "
         "attribution and notice (from README.md)"),
    ],
    ids=["research-file", "qwen-file", "tongyi-file", "research-card", "qwen-card", "apache-card"],
)  # fmt: skip
def test_info_names_qwen25_licenses(model, tmp_path, capsys, name, text, shown) -> None:
    copy = tmp_path / "m"
    copy.mkdir()
    for f in model.iterdir():
        (copy / f.name).symlink_to(f)
    (copy / name).write_text(text)
    assert _license_line(copy, capsys) == shown


def test_a_quantized_copy_keeps_the_cards_license_name(model, tmp_path, capsys) -> None:
    """quantize (as merge and convert) writes the source card's license into its own card: a card's
    ``license: other`` with ``license_name: qwen-research`` must stay so, as Hugging Face reads it."""
    carded = tmp_path / "carded"
    carded.mkdir()
    for f in model.iterdir():
        (carded / f.name).symlink_to(f)
    (carded / "README.md").write_text("---\nlicense: other\nlicense_name: qwen-research\n---\n\nA model.\n")
    out = tmp_path / "q"
    assert main(["quantize", str(carded), str(out), "--bits", "8", "--method", "rtn", "-q"]) == 0
    assert (
        (out / "README.md").read_text().startswith("---\nlicense: other\nlicense_name: qwen-research\n---\n")
    )
    assert _license_line(out, capsys) == f"{RESEARCH_LINE} (from README.md)"
