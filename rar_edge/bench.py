"""The ``rar-edge bench`` command (owned by the benchmark work; see benchmarks/latency.py)."""

from __future__ import annotations

import argparse


def add_bench_subcommand(sub: "argparse._SubParsersAction") -> None:
    """Registers ``bench`` on the CLI's subparsers (filled in by the latency-benchmark work)."""
    return None
