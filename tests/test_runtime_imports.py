"""ARCHITECTURE rule 1: the runtime never imports torch, transformers or optimum."""

import subprocess
import sys


def test_runtime_modules_import_no_export_stack():
    code = (
        "import sys\n"
        "import rar_edge, rar_edge.cli, rar_edge.pipeline, rar_edge.memory, rar_edge.encoders, rar_edge.boxes\n"
        "import rar_edge.detection, rar_edge.evaluate, rar_edge.ranker, rar_edge.prompts, rar_edge.finetune_data\n"
        "import rar_edge.bench\n"
        "rar_edge.cli.build_parser()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'optimum', 'tensorflow'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_export_without_the_export_tools_names_the_extra():
    """A runtime-only install: `rar-edge export clip ...` says which extra to install (exit 2)."""
    code = (
        "import sys\n"
        "sys.modules['rar_edge_export'] = None  # as if the export package were not installed\n"
        "from rar_edge.cli import main\n"
        "sys.exit(main(['export', 'clip', 'some/model', '-o', 'out']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "pip install 'rar-edge[export]'" in out.stderr and "Traceback" not in out.stderr
