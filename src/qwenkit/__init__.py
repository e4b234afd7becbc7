"""qwenkit."""
