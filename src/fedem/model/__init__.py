"""Seshu: configs, the tokenizer, loading, and the selective-scan reference."""
