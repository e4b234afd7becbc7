import sys
from pathlib import Path

# The GGUF writer the GGUF tests use (llama.cpp's names and layout) writes our MoE files too.
sys.path.insert(0, str(Path(__file__).parent.parent / "gguf"))
