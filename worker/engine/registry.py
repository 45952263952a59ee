"""Name -> component registries (one per component kind), torchdistill style."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import EngineError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table filled by a decorator at import time.

    ``get`` fails loudly with the error code of the component kind, naming the bad
    key and every valid one, because a typo in a job spec should be fixable from
    the error message alone.
    """

    def __init__(self, kind: str, error_code: str, param: str):
        self.kind = kind  # human name used in messages, e.g. "architecture"
        self.error_code = error_code  # EngineError code for unknown keys
        self.param = param  # spec location reported with unknown keys
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            valid = ", ".join(sorted(self._items))
            raise EngineError(
                self.error_code, f"unknown {self.kind} {name!r}; valid: {valid}", param=self.param
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
