"""Training: the loss inside the shard_map, the optimizer and train step, data windows."""
