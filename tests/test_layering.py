"""Dependencies point inwards: the package layout is the architecture, and this keeps it so.

protocol  <- broker <- connection <- transport implementations <- server <- cli
(sans-IO)   (no I/O)   (transport.base only)
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import tidings

PACKAGE = Path(tidings.__file__).parent

IO_LIBRARIES = {"trio", "trio_websocket", "hypercorn", "wsproto", "h11", "socket", "asyncio"}
OUTER_LAYERS = {
    "tidings.transport",
    "tidings.connection",
    "tidings.server",
    "tidings.web",
    "tidings.cli",
    "tidings.client",
    "tidings.demo",
    "tidings.endpoint",
    # Backplane implementations plug into the broker through broker/backplane.py.
    "tidings.backplane",
}


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module a file imports."""
    module = "tidings." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
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
    return found


def files(subpackage: str) -> list[Path]:
    root = PACKAGE / subpackage
    return sorted(root.rglob("*.py")) if root.is_dir() else [root.with_suffix(".py")]


def top(name: str) -> str:
    return name.split(".", maxsplit=1)[0]


def reaches(name: str, layers: set[str]) -> bool:
    return any(name == layer or name.startswith(layer + ".") for layer in layers)


@pytest.mark.parametrize("path", files("protocol"), ids=lambda p: p.name)
def test_protocol_is_sans_io(path: Path) -> None:
    bad = {
        name
        for name in imports_of(path)
        if top(name) in IO_LIBRARIES or reaches(name, OUTER_LAYERS | {"tidings.broker"})
    }
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", files("broker"), ids=lambda p: p.name)
def test_broker_knows_no_transport_or_connection(path: Path) -> None:
    bad = {
        name
        for name in imports_of(path)
        if top(name) in IO_LIBRARIES - {"trio"} or reaches(name, OUTER_LAYERS)
    }
    assert not bad, f"{path.name} imports {bad}"


def test_connection_is_written_against_the_transport_interface_only() -> None:
    bad = {
        name
        for name in imports_of(PACKAGE / "connection.py")
        if (reaches(name, {"tidings.transport"}) and name != "tidings.transport.base")
        or top(name) in IO_LIBRARIES - {"trio"}
        or reaches(name, {"tidings.server", "tidings.cli", "tidings.client"})
    }
    assert not bad


@pytest.mark.parametrize("path", files("transport"), ids=lambda p: p.name)
def test_transports_know_nothing_of_the_server_or_broker(path: Path) -> None:
    bad = {
        name
        for name in imports_of(path)
        if reaches(name, {"tidings.server", "tidings.broker", "tidings.connection", "tidings.cli"})
    }
    assert not bad, f"{path.name} imports {bad}"


def test_the_public_api_is_exported_and_documented() -> None:
    for name in tidings.__all__:
        obj = getattr(tidings, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__doc__, f"tidings.{name} has no docstring"
