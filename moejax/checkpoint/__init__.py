"""Checkpoints: format and checksums <- streamed blocks <- orbax save/restore <- operations."""
