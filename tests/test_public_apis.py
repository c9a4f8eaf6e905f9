"""The project uses its dependencies' public APIs only (a transformers 5.24 change of the undocumented
``masking_utils`` once broke every pipeline path on fresh installs): read every module of node/, protocol/,
scripts/ and simulations/ and refuse private imports and private attributes of dependencies."""

from __future__ import annotations

import ast
import inspect
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("node", "protocol", "scripts", "simulations") for p in (REPO / d).rglob("*.py")
                 if "rpc" not in p.relative_to(REPO).parts)  # node/api/rpc/ is protoc's generated code
OWN = {"node", "protocol", "scripts", "simulations", "tests"}
# transformers: its namespace (model and config classes) and its documented logging module, nothing else
TRANSFORMERS_MODULES = {"transformers", "transformers.utils.logging"}
# private attributes of torch modules and transformers configs that code reaches for when a public API exists
PRIVATE_ATTRIBUTES = {"_buffers", "_parameters", "_modules", "_non_persistent_buffers_set", "_attn_implementation",
                      "_attn_implementation_internal", "_forward_hooks", "_backward_hooks"}


def imports(tree: ast.AST):
    """(module, imported name or None, line) for every import statement."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                yield node.module, alias.name, node.lineno


def test_the_sources_are_found():
    assert len(SOURCES) > 50 and any(p.name == "stages.py" for p in SOURCES)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_private_imports_or_attributes_of_dependencies(path):
    import transformers

    tree = ast.parse(path.read_text(), str(path))
    where = path.relative_to(REPO)
    for module, name, line in imports(tree):
        top = module.split(".")[0]
        if top in OWN or top == "__future__":
            continue
        parts = module.split(".") + ([name] if name else [])
        assert not any(p.startswith("_") for p in parts), f"{where}:{line}: private import {'.'.join(parts)}"
        if top == "transformers":
            full = f"{module}.{name}" if name else module
            assert module in TRANSFORMERS_MODULES or full in TRANSFORMERS_MODULES, \
                f"{where}:{line}: {full} is not public API"
            if module == "transformers" and name:
                assert not inspect.ismodule(getattr(transformers, name)), \
                    f"{where}:{line}: `from transformers import {name}` imports an internal module"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            assert node.attr not in PRIVATE_ATTRIBUTES, f"{where}:{node.lineno}: private attribute .{node.attr}"
            if isinstance(node.value, ast.Name) and node.value.id == "transformers":
                target = getattr(transformers, node.attr, None)
                assert not inspect.ismodule(target), f"{where}:{node.lineno}: transformers.{node.attr} is a module"


def test_the_checker_catches_what_broke_the_pipeline(tmp_path):
    """The rule itself: the import stages.py used to make is refused."""
    bad = ast.parse("from transformers import masking_utils\nmask = module._non_persistent_buffers_set\n")
    (module, name, _), = imports(bad)
    import transformers

    assert inspect.ismodule(getattr(transformers, name))
    assert any(isinstance(n, ast.Attribute) and n.attr in PRIVATE_ATTRIBUTES for n in ast.walk(bad))
