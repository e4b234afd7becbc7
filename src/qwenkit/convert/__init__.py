"""Converters between checkpoint formats, built from the loader's mappings and the saver."""
