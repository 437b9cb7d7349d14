"""Whether two route templates take a common path: decided exactly for Starlette's parameter types.

A free route before a metered template that takes some of its paths serves those paths unbilled,
so the table must know which templates share paths. Sample paths miss some (``/{org}/b/items``
and ``/b/{rest:path}`` share ``/b/b/items``); a walk of both templates' automata at once does not.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable

from .routes import _PARAMETER

__all__ = ["overlap"]

#: The characters of a token: one literal character, or a class (a test of a character).
Chars = str | Callable[[str], bool]
#: A template as a sequence of tokens: its characters, and how many it takes ("1", "?": one at
#: most, "*": any number).
Token = tuple[Chars, str]


def _any(char: str) -> bool:
    return True


def _not_slash(char: str) -> bool:
    return char != "/"


_digit = "0123456789".__contains__
_hex = "0123456789abcdefABCDEF".__contains__
_DIGITS: list[Token] = [(_digit, "1"), (_digit, "*")]
_HEX: Token = (_hex, "1")
_UUID: list[Token] = [_HEX] * 8 + [token for run in (4, 4, 4, 12) for token in [("-", "?"), *[_HEX] * run]]

#: Starlette's parameter types, as the token sequences their patterns take (a float's fraction is optional).
_TYPES: dict[str, tuple[list[Token], ...]] = {
    "str": ([(_not_slash, "1"), (_not_slash, "*")],),
    "path": ([(_any, "*")],),
    "int": (_DIGITS,),
    "float": (_DIGITS, [*_DIGITS, (".", "1"), *_DIGITS]),
    "uuid": (_UUID,),
}


def overlap(template: str, other: str) -> bool | None:
    """Whether some path matches both templates; None where one has a parameter type of the app's own."""
    spelled, other_spelled = _spellings(template), _spellings(other)
    if spelled is None or other_spelled is None:
        return None
    if ":path}" not in template + other and template.count("/") != other.count("/"):
        return False  # only a path parameter takes a slash
    return any(_meet(tokens, others) for tokens in spelled for others in other_spelled)


@functools.lru_cache(maxsize=4096)  # (start-up only: an app's templates, each against the later ones)
def _spellings(template: str) -> tuple[list[Token], ...] | None:
    """The template's token sequences, one per choice its parameters leave open."""
    parts = _PARAMETER.split(template)  # literal, name, type, literal, name, type, ..., literal
    choices: list[tuple[list[Token], ...]] = [([(char, "1") for char in parts[0]],)]
    for at in range(1, len(parts), 3):
        kind = _TYPES.get(parts[at + 1] or "str")
        if kind is None:
            return None
        choices += [kind, ([(char, "1") for char in parts[at + 2]],)]
    return tuple(list(itertools.chain.from_iterable(picked)) for picked in itertools.product(*choices))


def _share(chars: Chars, other: Chars) -> bool:
    """Whether some character is of both (any two classes share the digits)."""
    if isinstance(chars, str):
        return chars == other if isinstance(other, str) else other(chars)
    return chars(other) if isinstance(other, str) else True


def _meet(tokens: list[Token], others: list[Token]) -> bool:
    """Whether some string spells both token sequences: a search of the pairs of positions in
    them that a common prefix reaches, taking a character in both or skipping an optional token."""
    end = (len(tokens), len(others))
    todo, seen = [(0, 0)], {(0, 0)}
    while todo:
        at, other_at = todo.pop()
        if (at, other_at) == end:
            return True
        steps = []
        if at < end[0] and tokens[at][1] != "1":
            steps.append((at + 1, other_at))
        if other_at < end[1] and others[other_at][1] != "1":
            steps.append((at, other_at + 1))
        if at < end[0] and other_at < end[1]:
            (chars, count), (other_chars, other_count) = tokens[at], others[other_at]
            if _share(chars, other_chars):
                steps.append((at + (count != "*"), other_at + (other_count != "*")))
        for step in steps:
            if step not in seen:
                seen.add(step)
                todo.append(step)
    return False
