"""(8b) The loads of scenario (8) alone: torch.load (plain and mmap=True), DCP and ours, each load + the first
optimizer step in a fresh process, warm (only that format's files cached) and cold.

    python benchmarks/run.py --only peer_loads --sizes 350M
"""

from benchmarks.peers import run_loads as run

__all__ = ["run"]
