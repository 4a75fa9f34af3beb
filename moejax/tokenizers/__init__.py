"""Tokenizers: text <-> token ids."""
