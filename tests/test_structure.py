"""The house rules of docs/architecture.md, checked on the source: which room may import which."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "llmzoo"


def llmzoo_imports(path: Path) -> set[str]:
    """The llmzoo modules ``path`` imports, at module level or inside functions (``llmzoo.x.y``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name == "llmzoo" or name.startswith("llmzoo.")}


def all_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def files(room: str) -> list[Path]:
    found = sorted((PACKAGE / room).rglob("*.py")) if (PACKAGE / room).is_dir() else [PACKAGE / f"{room}.py"]
    assert found and all(path.exists() for path in found), room
    return found


# room -> the llmzoo modules it may import (prefixes)
ALLOWED = {
    "layers": ("llmzoo.layers",),
    "files": (),
    "checkpoints": ("llmzoo.files",),
    "models": ("llmzoo.layers", "llmzoo.models", "llmzoo.checkpoints", "llmzoo.generation", "llmzoo.strategies",
               "llmzoo.quantize",
               "llmzoo.pretrained"),  # only for DPO's frozen reference, re-read from --model.pretrained on resume
    "hf": ("llmzoo.hf", "llmzoo.models", "llmzoo.checkpoints", "llmzoo.files", "llmzoo.data.tokenizer", "llmzoo"),
    "data": ("llmzoo.data", "llmzoo.files", "llmzoo.checkpoints"),
}


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_each_room_imports_only_what_it_may(room):
    for path in files(room):
        for name in llmzoo_imports(path):
            assert name.startswith(ALLOWED[room]) if ALLOWED[room] else False, \
                f"{path.relative_to(PACKAGE.parent)} imports {name}"


@pytest.mark.parametrize("room", ["layers", "models"])
def test_layers_and_models_know_no_distribution_and_no_cli(room):
    for path in files(room):
        imported = all_imports(path)
        assert not {name for name in imported if name.startswith("lightning.pytorch.strategies")}, path
        assert not {name for name in imported if name.startswith("llmzoo.cli")}, path
        assert "torch.distributed.fsdp" not in imported, path


def test_layers_know_no_lightning():
    for path in files("layers"):
        assert not {name for name in all_imports(path) if name.split(".")[0] == "lightning"}, path


def module_level_imports(path: Path) -> set[str]:
    """What ``path`` imports when it is imported (not inside its functions)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_the_command_line_imports_torch_only_after_its_preflight_checks():
    """``llmzoo`` reports a mistyped class or config file before it imports torch (docs/reliability.md): the
    package, the CLI package and its entry point import only the standard library and the preflight checks,
    which import only the standard library and yaml."""
    import sys

    stdlib = sys.stdlib_module_names | {"__future__"}
    for path in (PACKAGE / "__init__.py", PACKAGE / "cli" / "__init__.py", PACKAGE / "cli" / "command.py"):
        imported = {name for name in module_level_imports(path) if name.split(".")[0] not in stdlib}
        assert imported <= {"llmzoo.cli.command", "llmzoo.cli.preflight"}, (path, imported)
    assert {name.split(".")[0] for name in all_imports(PACKAGE / "cli" / "preflight.py")} <= stdlib | {"yaml"}
