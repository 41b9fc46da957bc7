"""What a checkpoint holds: live objects turned into plain state and back (model, optimizer, RNG, data position)."""
