"""One refusal rule of ckpt.collect.restorable's tables, and what their rows share."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from ckpt.collect.target import DELETED

T = TypeVar("T")

NOT_YET = "not supported yet"
PROC_PID = re.compile(r"/proc/\d+(/|$)")


@dataclass(frozen=True)
class Rule(Generic[T]):
    """Refuse a subject when ``applies``; ``says`` is formatted with the subject's fields
    (see the *_fields functions)."""

    applies: Callable[[T], bool]
    says: str
    table: str = ""  # what `ckpt check` prints, where ``says`` left blank says too little


def first(rules: tuple[Rule[T], ...], subject: T, fields: Callable[[T], dict[str, object]],
          ) -> str | None:
    """The refusal of the first rule that applies to ``subject``, or None."""
    for rule in rules:
        if rule.applies(subject):
            return rule.says.format(**fields(subject))
    return None


def deleted(path: str) -> bool:
    return path.endswith(DELETED)


def shown(path: str) -> str:
    return path.removesuffix(DELETED)
