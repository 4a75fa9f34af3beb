"""What names a mesh axis: mesh shapes, the sharding rules table, placement, the pipeline schedule."""
