"""The `moejax bench ...` commands: benchmarks of the model, its kernels, training, serving and checkpoints.
They use moejax.bench (clients, peers, rooflines); the product never imports either."""
