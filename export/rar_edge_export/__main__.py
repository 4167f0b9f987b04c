"""``python -m rar_edge_export``: the export commands without the rar-edge CLI."""

from .cli import main_export

if __name__ == "__main__":
    raise SystemExit(main_export())
