"""Tool use: call formats (hermes ``<tool_call>``, Qwen v1 ReAct), their streaming parsers, constrained
decoding (llguidance grammars as token masks), the agent loop and the sandboxed code interpreter."""
