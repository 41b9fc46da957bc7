"""The read line: which checkpoints exist and count, verification, and loading into live objects."""
