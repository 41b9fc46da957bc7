"""The parity suite runs the same tiny GPT-2 Trainers as tests/hf: one torch thread (see that conftest)."""

from tests.hf.conftest import one_torch_thread  # noqa: F401  (autouse, package scope: applies to this package)
