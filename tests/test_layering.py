"""Dependencies point inwards: the package layout is the architecture, and this keeps it so.

Each folder (or top-level module) of ``src/tidings`` has a rank; a module may
import its own folder and anything of a lower rank, never upwards, and no two
modules may import each other, even through others (type-only imports count:
a cycle is a cycle for a reader too). ``docs/architecture.md`` draws the same.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Iterator
from pathlib import Path

import pytest

import tidings

PACKAGE = Path(tidings.__file__).parent
EXAMPLES = PACKAGE.parent.parent / "examples"

#: Inner to outer. A unit is a folder or a top-level module of the package.
LAYERS: list[tuple[str, ...]] = [
    ("_version", "protocol", "stats"),  # the wire, sans I/O; plain counters
    ("errors", "logs"),  # one error hierarchy; log formatting
    ("transport", "broker"),  # bytes to sockets; topic state and fan-out
    ("auth", "app", "backplane"),  # who a client is; what handlers see; Redis
    ("config",),
    ("connection",),  # one client: reader, writer, pinger; endpoints, sessions
    ("node",),  # the core server
    ("http", "endpoints", "demo", "tokens"),  # around the core; tokens for the CLI
    ("server",),  # the composition root
    ("client", "publisher"),  # outside: the Python clients need no server
    ("workers",),  # several node processes on one port, supervised
    ("cli",),
    ("__init__", "__main__"),  # the public surface
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}

IO_LIBRARIES = {"trio", "trio_websocket", "hypercorn", "wsproto", "h11", "socket", "asyncio"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("tidings", *parts))


def imports_of(path: Path, module: str | None = None) -> set[str]:
    """Absolute names of every module a file imports (``from x import y``: ``x.y`` too)."""
    module = module or module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            # ``from . import client``: the module ``tidings.client``.
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return found


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def unit_of(name: str) -> str | None:
    """The layer unit of module ``tidings.x.y``, or None outside the package."""
    parts = name.split(".")
    if parts[0] != "tidings":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def own_modules(path: Path) -> set[str]:
    """The package's modules a file imports (names of objects dropped)."""
    known = {module_name(source) for source in sources()}
    return {name for name in imports_of(path) if name in known} - {module_name(path)}


def test_every_unit_has_a_layer() -> None:
    units = {unit_of(module_name(path)) for path in sources()}
    assert units <= set(RANK), f"no layer for {units - set(RANK)}: add it to LAYERS"


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_upward_import(path: Path) -> None:
    unit = unit_of(module_name(path))
    assert unit is not None
    upward = {
        name
        for name in own_modules(path)
        if (other := unit_of(name)) is not None
        and other != unit
        and other != "__init__"
        and RANK[other] >= RANK[unit]
    }
    assert not upward, f"{path.name} ({unit}, layer {RANK[unit]}) imports upward: {upward}"


def cycles() -> Iterator[list[str]]:
    graph = {module_name(path): own_modules(path) for path in sources()}
    # A package's __init__ is imported by its modules implicitly; only real edges count.
    visiting: list[str] = []
    done: set[str] = set()

    def visit(name: str) -> Iterator[list[str]]:
        if name in visiting:
            yield [*visiting[visiting.index(name) :], name]
            return
        if name in done:
            return
        visiting.append(name)
        for target in sorted(graph.get(name, ())):
            yield from visit(target)
        visiting.pop()
        done.add(name)

    for name in sorted(graph):
        yield from visit(name)


def test_no_import_cycle() -> None:
    found = [" -> ".join(cycle) for cycle in cycles()]
    assert not found, "import cycles:\n" + "\n".join(found)


def test_protocol_is_sans_io() -> None:
    for path in (PACKAGE / "protocol").rglob("*.py"):
        bad = {name for name in imports_of(path) if name.split(".")[0] in IO_LIBRARIES}
        assert not bad, f"{path.name} imports {bad}"


def test_broker_knows_no_socket_library() -> None:
    for path in (PACKAGE / "broker").rglob("*.py"):
        bad = {name for name in imports_of(path) if name.split(".")[0] in IO_LIBRARIES - {"trio"}}
        assert not bad, f"{path.name} imports {bad}"


def test_connection_is_written_against_the_transport_interface_only() -> None:
    for path in (PACKAGE / "connection").rglob("*.py"):
        bad = {
            name
            for name in own_modules(path)
            if name.startswith("tidings.transport.") and name != "tidings.transport.base"
        } | {name for name in imports_of(path) if name.split(".")[0] in IO_LIBRARIES - {"trio"}}
        assert not bad, f"{path.name} imports {bad}"


def test_transports_know_only_their_interface() -> None:
    for path in (PACKAGE / "transport").rglob("*.py"):
        bad = {name for name in own_modules(path) if not name.startswith("tidings.transport")}
        assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("module", ["client.py", "publisher.py"])
def test_the_clients_need_no_server(module: str) -> None:
    bad = {
        name
        for name in own_modules(PACKAGE / module)
        if unit_of(name) not in {"protocol", "errors", "_version"}
    }
    assert not bad, f"{module} imports {bad}"


def example_sources() -> list[Path]:
    return sorted(EXAMPLES.rglob("*.py"))


@pytest.mark.parametrize("path", example_sources(), ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_examples_use_only_the_public_api(path: Path) -> None:
    """An example is what a user writes: names exported from ``tidings``, and its two
    clients (``tidings.client``, ``tidings.publisher``) with what they export."""
    internal = {
        name
        for name in imports_of(path, "examples." + ".".join(path.relative_to(EXAMPLES).parts))
        if name.startswith("tidings.")
        and ".".join(name.split(".")[:2]) not in {"tidings.client", "tidings.publisher"}
        and not _exported(name.removeprefix("tidings."))
    }
    assert not internal, f"{path.relative_to(EXAMPLES)} imports internal modules: {internal}"


def _exported(name: str) -> bool:
    """``from tidings import X`` shows up as ``tidings.X``: fine when X is exported."""
    return "." not in name and name in tidings.__all__


def test_the_public_api_is_exported_and_documented() -> None:
    for name in tidings.__all__:
        obj = getattr(tidings, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__doc__, f"tidings.{name} has no docstring"
