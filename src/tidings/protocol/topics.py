"""Topic names and the allow-list patterns that restrict them."""

from __future__ import annotations

from fnmatch import fnmatchcase

MAX_TOPIC_LENGTH = 256


def topic_problem(topic: str) -> str | None:
    """Why ``topic`` is not a valid topic name, or None when it is.

    A topic is 1 to 256 characters with no control characters; anything else
    (dots, slashes, colons) is the application's to give meaning to.
    """
    if not topic:
        return "topic must not be empty"
    if len(topic) > MAX_TOPIC_LENGTH:
        return f"topic is longer than {MAX_TOPIC_LENGTH} characters"
    if not topic.isprintable():
        return "topic must not contain control or non-printable characters"
    return None


class TopicFilter:
    """Which topics clients may use: every topic, or those matching a pattern.

    Patterns are shell-style (``deploy.*``, ``app-?``), matched case-sensitively.
    An empty pattern list allows every topic, unless ``empty_allows_all`` is
    false (a token's empty ``publish`` claim allows nothing).
    """

    __slots__ = ("_exact", "_patterns", "restricted")

    def __init__(
        self, patterns: tuple[str, ...] | list[str] = (), *, empty_allows_all: bool = True
    ) -> None:
        wildcard = set("*?[")
        self._exact = frozenset(p for p in patterns if not wildcard & set(p))
        self._patterns = tuple(p for p in patterns if wildcard & set(p))
        self.restricted = bool(patterns) or not empty_allows_all

    def allows(self, topic: str) -> bool:
        if not self.restricted or topic in self._exact:
            return True
        return any(fnmatchcase(topic, p) for p in self._patterns)
