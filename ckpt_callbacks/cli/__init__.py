"""The `ckpt-callbacks` command: list, inspect, verify, export and prune checkpoints, through the core."""

from ckpt_callbacks.cli.commands import build_parser, main

__all__ = ["build_parser", "main"]
