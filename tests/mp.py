"""Tests run ranks through the library's launcher (one torch thread per rank)."""
from dualpipe.launch import RankError, free_port, run_ranks

__all__ = ["run_ranks", "RankError", "free_port"]
