"""Find a model's license and say what it allows, so users see the terms before they build on a model."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE", "NOTICE", "NOTICE.txt", "NOTICE.md")

TONGYI = (
    "Tongyi Qianwen License: free for commercial use by products or services with fewer than "
    "100 million monthly active users; above that, a separate commercial license from Alibaba Cloud "
    "is required"
)
TONGYI_RESEARCH = (
    "Tongyi Qianwen Research License: research and non-commercial use only; commercial use needs a "
    "separate license from Alibaba Cloud"
)
# Qwen2.5's own agreements (2024-09-19), which name no "Tongyi Qianwen": the 3B's and Qwen2.5-VL-3B's
# research license, and the 72B's; their model cards say `license: other` with `license_name` these ids
QWEN_RESEARCH = (
    "Qwen Research License: research and evaluation only (non-commercial); commercial use needs a "
    "separate license from Alibaba Cloud"
)
QWEN = (
    "Qwen License: free for commercial use by products or services with fewer than 100 million monthly "
    "active users; above that, a separate commercial license from Alibaba Cloud is required"
)
APACHE = (
    "Apache License 2.0: commercial use, modification and redistribution allowed, with attribution and notice"
)
_BY_ID = {
    "tongyi-qianwen": TONGYI,
    "tongyi-qianwen-research": TONGYI_RESEARCH,
    "qwen-research": QWEN_RESEARCH,
    "qwen": QWEN,
    "apache-2.0": APACHE,
    "mit": "MIT License: commercial use allowed with the copyright notice",
}


@dataclass(frozen=True)
class LicenseInfo:
    name: str
    terms: str
    source: str  # where it was found: a file name or a metadata key
    named_other: bool = False  # a card's `license: other` with this name in `license_name`


def identify(text: str) -> tuple[str, str] | None:
    """Recognize a license from its text or SPDX-like id."""
    low = text.lower()
    if "tongyi qianwen research license" in low:
        return "tongyi-qianwen-research", TONGYI_RESEARCH
    if "tongyi qianwen" in low:
        return "tongyi-qianwen", TONGYI
    if "qwen research license agreement" in low:
        return "qwen-research", QWEN_RESEARCH
    if "qwen license agreement" in low:
        return "qwen", QWEN
    if "apache license" in low and "version 2.0" in low:
        return "apache-2.0", APACHE
    key = low.strip()
    if key in _BY_ID:
        return key, _BY_ID[key]
    return None


def find_license(path: str | Path, metadata_license: str | None = None) -> LicenseInfo | None:
    """Look in license files, the model card's front matter, then checkpoint metadata (e.g. GGUF)."""
    p = Path(path)
    directory = p if p.is_dir() else p.parent
    if p.is_dir():
        for name in LICENSE_FILES:
            f = directory / name
            if f.is_file():
                found = identify(f.read_text(errors="replace")[:20000])
                if found:
                    return LicenseInfo(found[0], found[1], name)
                return LicenseInfo("custom", f"see {name} in the model directory", name)
        card = directory / "README.md"
        if card.is_file():
            front = card.read_text(errors="replace")[:4000]
            m = re.search(r"^license:\s*(\S+)", front, re.MULTILINE)
            if m:
                name = m.group(1).strip("\"'")  # YAML may quote it
                # `license: other` names its license in license_name (qwen, qwen-research)
                other = re.search(r"^license_name:\s*(\S+)", front, re.MULTILINE)
                named_other = name == "other" and other is not None
                if named_other:
                    name = other.group(1).strip("\"'")
                found = identify(name)
                terms = found[1] if found else f"license '{name}' (see the model card)"
                return LicenseInfo(name, terms, "README.md", named_other)
        cfg = directory / "config.json"
        if cfg.is_file() and json.loads(cfg.read_text()).get("model_type") == "qwen":
            return LicenseInfo(
                "unknown",
                "no license file found; Qwen v1 weights are released under the "
                + TONGYI
                + " (Qwen-1.8B: the Research License, non-commercial); check the original repository",
                "model_type qwen",
            )
    if metadata_license:
        found = identify(metadata_license)
        return LicenseInfo(
            metadata_license, found[1] if found else f"license '{metadata_license}'", "metadata"
        )
    return None
