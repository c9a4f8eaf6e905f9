"""The tree keeps the shape docs/ARCHITECTURE.md describes (issue 12): read every module of node/, protocol/ and
simulations/ and check the rules a regroup established, so that a change that breaks one fails here, not in a
review months later.

  * protocol/ never imports node/; simulations/ imports no node/ (it runs protocol/'s planning code unchanged).
  * No import cycle between modules (function-level imports count too).
  * No module over MAX_LINES lines.
  * No private name (``_x``) imported from another module of the project, and no name imported from a module
    that only imports it itself (a re-export): import a name from where it is defined. Package front doors
    (``__init__.py``) are exempt: re-exporting is what protocol/__init__.py is for.
  * Every package has a front-door docstring that names each of its modules and subpackages.
  * msgpack is spoken in one place: protocol/wire.py.
"""

from __future__ import annotations

import ast
import pathlib
from collections import defaultdict

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
ROOTS = ("node", "protocol", "simulations", "swarmnode")
MAX_LINES = 600
GENERATED = ("node/api/rpc/",)  # protoc's output (tests/test_protos.py keeps it current)


def sources() -> list[pathlib.Path]:
    return sorted(p for root in ROOTS for p in (REPO / root).rglob("*.py")
                  if not str(p.relative_to(REPO)).startswith(GENERATED))


def module_of(path: pathlib.Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_of(p): p for p in sources()}


def own_imports(path: pathlib.Path) -> list[tuple[str, str | None, int]]:
    """(module, name or None, line) of every import of the project's own modules, at any depth in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] in ROOTS]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] in ROOTS:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                out.append((child, None, node.lineno) if child in MODULES else (node.module, alias.name, node.lineno))
    return out


def top_level_names(module: str) -> tuple[set[str], set[str]]:
    """(names a module defines, names it only imports) at its top level."""
    defined, imported = set(), set()
    for node in ast.parse(MODULES[module].read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            defined |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            imported |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return defined, imported - defined


def test_the_modules_are_found():
    assert {"node.daemon", "protocol.wire", "protocol.allreduce.averager", "simulations.federated"} <= set(MODULES)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.startswith(("node", "swarmnode"))))
def test_protocol_and_simulations_never_import_node(module):
    bad = [f"line {line}: {mod}" for mod, _, line in own_imports(MODULES[module]) if mod.split(".")[0] == "node"]
    assert not bad, f"{module} imports node/: {bad}"


def test_no_import_cycles():
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in MODULES.items():
        for target, _, _ in own_imports(path):
            while target not in MODULES and "." in target:
                target = target.rpartition(".")[0]
            if target in MODULES and target != module and not module.startswith(target + "."):
                graph[module].add(target)
    # Tarjan's strongly connected components: any with more than one module is a cycle
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(MODULES):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_too_long(module):
    lines = MODULES[module].read_text().count("\n")
    assert lines <= MAX_LINES, f"{MODULES[module].relative_to(REPO)} has {lines} lines (at most {MAX_LINES})"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_names_are_imported_from_where_they_are_defined_and_never_private(module):
    bad = []
    for target, name, line in own_imports(MODULES[module]):
        if name is None or target not in MODULES:
            continue
        if name.startswith("_"):
            bad.append(f"line {line}: private {target}.{name}")
        elif not MODULES[target].name == "__init__.py":
            defined, only_imported = top_level_names(target)
            if name in only_imported and name not in defined:
                bad.append(f"line {line}: {name} is only re-exported by {target}")
    assert not bad, f"{module}: {bad}"


@pytest.mark.parametrize("package", sorted(m for m, p in MODULES.items() if p.name == "__init__.py"))
def test_every_package_has_a_front_door_naming_its_modules(package):
    path = MODULES[package]
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert doc, f"{path.relative_to(REPO)} has no docstring"
    if package == "simulations":
        names = [p.stem for p in path.parent.glob("*.py") if p.name != "__init__.py"]
    else:
        names = [p.name for p in path.parent.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
        names += [f"{p.name}/" for p in path.parent.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    missing = [n for n in names if n not in doc]
    assert not missing, f"{path.relative_to(REPO)}'s docstring does not name {missing}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("protocol")))
def test_msgpack_only_in_wire(module):
    if module == "protocol.wire":
        return
    tree = ast.parse(MODULES[module].read_text())
    uses = [n.lineno for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
            and any(a.name.split(".")[0] == "msgpack" for a in n.names)
            or isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "msgpack"]
    assert not uses, f"{module} imports msgpack (lines {uses}); encode with protocol.wire.pack"
