"""Tooling around the runtime: the `rar-edge` command, bench, demo, eval, fine-tuning data.

Nothing in the runtime (`rar_edge` outside this package) imports from here.
"""
