"""What an API key may do, and who is calling."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from serving.errors import InvalidInput


class Scope(str, enum.Enum):
    """`submit`: create, cancel and retry jobs; `read`: see one's own jobs and the models;
    `admin`: everything `submit` and `read` allow (and operator endpoints as they appear)."""

    SUBMIT = "submit"
    READ = "read"
    ADMIN = "admin"


ALL_SCOPES = frozenset(Scope)
DEFAULT_SCOPES = frozenset({Scope.SUBMIT, Scope.READ})


def parse_scopes(text: str | Iterable[str]) -> frozenset[Scope]:
    """`"submit,read"` (or an iterable of names) -> scopes; unknown names are refused."""
    names = text.split(",") if isinstance(text, str) else list(text)
    scopes: set[Scope] = set()
    for name in (n.strip().lower() for n in names):
        if not name:
            continue
        try:
            scopes.add(Scope(name))
        except ValueError:
            valid = ", ".join(s.value for s in Scope)
            raise InvalidInput(f"Unknown scope {name!r}; valid scopes are {valid}.", code="invalid_scope") from None
    if not scopes:
        raise InvalidInput("At least one scope is required.", code="invalid_scope")
    return frozenset(scopes)


def format_scopes(scopes: Iterable[Scope]) -> str:
    return ",".join(sorted(s.value for s in scopes))


@dataclass(frozen=True)
class Principal:
    """The caller behind a request: the owner whose jobs it sees, and what its key may do."""

    owner_id: str
    scopes: frozenset[Scope]
    key_id: str  # rate limits are per key; "local" when authentication is disabled

    def allows(self, scope: Scope) -> bool:
        return scope in self.scopes or Scope.ADMIN in self.scopes
