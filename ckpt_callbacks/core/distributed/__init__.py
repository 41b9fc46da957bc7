"""Several processes: the collectives of a commit, and whole tensors gathered from sharded models."""
