"""The sharded transformer program and the model families that plug into it (one package each)."""
