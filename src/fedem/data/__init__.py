"""Corpus loading, normalisation, language balancing, packing and prompts."""
