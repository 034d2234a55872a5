"""Value classes without ``dataclasses`` (which costs milliseconds of every ``sendmail``
start): a class lists its fields in ``__slots__``, in the order of its ``__init__``
arguments, and gets dataclass behaviour from these bases.

* :class:`Record`: equality by value (same class only) and a dataclass-style repr; not
  hashable, like a mutable dataclass.
* :class:`Frozen`: the same, read-only after ``__init__`` (which sets fields with
  ``object.__setattr__``), hashed by value, and picklable.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: importing typing costs milliseconds of start-up
if TYPE_CHECKING:
    from typing import Any, Self


class Record:
    __slots__ = ()

    def _fields(self) -> tuple[str, ...]:
        fields: tuple[str, ...] = type(self).__slots__
        return fields

    def _key(self) -> tuple[object, ...]:
        return tuple([getattr(self, name) for name in self._fields()])

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Record) and other.__class__ is self.__class__:
            return self._key() == other._key()
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        fields = ", ".join([f"{name}={getattr(self, name)!r}" for name in self._fields()])
        return f"{self.__class__.__qualname__}({fields})"


class Frozen(Record):
    __slots__ = ()

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(self._key())

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}")

    def __reduce__(self) -> tuple[type[Frozen], tuple[object, ...]]:
        return (self.__class__, self._key())

    def replace(self, **changes: Any) -> Self:
        """A copy with the given fields changed (what ``dataclasses.replace`` does); an
        unknown field is a TypeError."""
        fields = {name: getattr(self, name) for name in self._fields()}
        fields.update(changes)
        return self.__class__(**fields)
