"""ARCHITECTURE rule 1: arrows point down and inward.

The runtime (`rar_edge` outside `rar_edge/tools/`) never imports the tooling, the exporters or the heavy
stacks; checked twice: statically, by walking every import statement of every runtime module (lazy imports
inside functions included), and dynamically, by importing everything and looking at `sys.modules`.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rar_edge"
FORBIDDEN = (
    "rar_edge.tools",
    "rar_edge_export",
    "matplotlib",
    "torch",
    "transformers",
    "optimum",
    "tensorflow",
    "ray",
    "tf2onnx",
)
# The `python -m rar_edge` entry point is the command's, not the runtime's.
ENTRY_POINTS = {PACKAGE / "__main__.py"}


def _module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path = PACKAGE) -> set[str]:
    """Every module an import statement in ``path`` names (relative imports resolved against ``root``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def _runtime_files() -> list[Path]:
    tools = PACKAGE / "tools"
    return sorted(p for p in PACKAGE.rglob("*.py") if tools not in p.parents and p not in ENTRY_POINTS)


def _is_forbidden(mod: str) -> bool:
    return any(mod == f or mod.startswith(f + ".") for f in FORBIDDEN)


def test_the_tooling_lives_in_its_own_package():
    assert (PACKAGE / "tools" / "__init__.py").is_file()
    assert (PACKAGE / "tools" / "cli.py").is_file()
    assert len(_runtime_files()) >= 15


@pytest.mark.parametrize("path", _runtime_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_runtime_module_imports_no_tooling(path):
    bad = sorted(m for m in imported_modules(path) if _is_forbidden(m))
    assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {bad}"


def test_the_walker_sees_lazy_and_relative_imports(tmp_path):
    """The check itself can fail: a lazy relative import of the tooling is found."""
    pkg = tmp_path / "rar_edge" / "index"
    pkg.mkdir(parents=True)
    f = pkg / "x.py"
    f.write_text("def f():\n    from ..tools import cli\n    import torch.nn\n")
    mods = imported_modules(f, tmp_path / "rar_edge")
    assert "rar_edge.tools" in mods and "torch.nn" in mods
    assert _is_forbidden("rar_edge.tools.cli") and not _is_forbidden("rar_edge.toolsmith")


def _modules_loaded_after(imports: str, prefixes: tuple[str, ...]) -> list[str]:
    """The modules under ``prefixes`` that a fresh interpreter holds after running ``imports``."""
    code = (
        "import sys\n"
        f"{imports}\n"
        f"print(','.join(sorted(m for m in sys.modules if any(m == f or m.startswith(f + '.') for f in {prefixes!r}))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [m for m in out.stdout.strip().split(",") if m]


def test_runtime_modules_import_no_export_stack():
    mods = ", ".join(_module_name(p) for p in _runtime_files() if p.name != "__init__.py" or p.parent != PACKAGE)
    assert _modules_loaded_after(f"import rar_edge, {mods}", FORBIDDEN) == []


def test_the_command_imports_no_export_stack_until_asked():
    imports = (
        "import rar_edge.tools.cli, rar_edge.tools.bench, rar_edge.tools.evaluate, rar_edge.tools.finetune_data\n"
        "rar_edge.tools.cli.build_parser()"
    )
    assert _modules_loaded_after(imports, ("torch", "transformers", "optimum", "tensorflow")) == []


def test_export_without_the_export_tools_names_the_extra():
    """A runtime-only install: `rar-edge export clip ...` says which extra to install (exit 2)."""
    code = (
        "import sys\n"
        "sys.modules['rar_edge_export'] = None  # as if the export package were not installed\n"
        "from rar_edge.tools.cli import main\n"
        "sys.exit(main(['export', 'clip', 'some/model', '-o', 'out']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "pip install 'rar-edge[export]'" in out.stderr and "Traceback" not in out.stderr
