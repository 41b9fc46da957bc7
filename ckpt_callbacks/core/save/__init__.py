"""The save line: when (policy), staging into host memory, background writing, commit, retention."""
