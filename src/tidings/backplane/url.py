"""Backplane URLs: which Redis deployment, where, with what credentials."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit


def parse_url(url: str) -> tuple[str, list[tuple[str, int]], int, str, str | None, str | None]:
    """(kind, [(host, port)], db, sentinel service, username, password) of a backplane URL.

    ``redis://[user:pass@]host:port/db``, ``redis+cluster://host:port[,host:port]``,
    ``redis+sentinel://host:port[,host:port]/service[/db]``.
    """
    parts = urlsplit(url)
    kinds = {"redis": "redis", "redis+cluster": "cluster", "redis+sentinel": "sentinel"}
    if parts.scheme not in kinds:
        raise ValueError(f"backplane URL scheme must be one of {', '.join(kinds)}: {url!r}")
    kind = kinds[parts.scheme]
    netloc = parts.netloc.rpartition("@")[2]
    hosts: list[tuple[str, int]] = []
    default_port = 26379 if kind == "sentinel" else 6379
    for item in netloc.split(","):
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
        host = host.strip("[]") or "127.0.0.1"
        try:
            hosts.append((host, int(port or default_port)))
        except ValueError:
            raise ValueError(f"bad port in backplane URL {url!r}") from None
    path = [part for part in parts.path.split("/") if part]
    service = ""
    if kind == "sentinel":
        if not path:
            raise ValueError(f"a sentinel URL names the service: {url!r}")
        service = path.pop(0)
    db = 0
    if path:
        try:
            db = int(path[0])
        except ValueError:
            raise ValueError(f"bad database number in backplane URL {url!r}") from None
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return kind, hosts, db, service, username, password


def redacted(url: str) -> str:
    """The URL without its password, for logs and /health."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()
