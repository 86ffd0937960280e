"""One namespace of `model` strings: every adapter name, alias and experiment name, with its kind and
its owner, and the one claim every path that creates a name goes through.

Invariants:
- A name has one kind (adapter | alias | experiment) and one owner: a tenant, or None for the admins
  (hand-placed and CLI adapters, whatever an admin or a server without auth creates).
- `claim` runs inside the transaction that creates the thing named, so a name is taken exactly when its
  thing exists, and locks the name until it commits: two replicas adding versions of one adapter take
  turns instead of racing for the next number. It refuses a reserved name (the base model's), a name of another kind, a tenant's
  claim on a name it does not own, and an experiment over an existing one. Admins may add to any name
  of the kind it has (a new version, a moved alias); the owner stays.
- A tenant is never told whose a name is: every refusal it gets reads "name 'x' is not available".
- An adapter name stays claimed when its versions are deleted (history; a tenant's stays its own).
  Deleting an alias or an experiment frees its name (`free`).
- `get` answers from memory (the request path asks it for every request with auth on), exact after
  this process's writes and at most a second old for other processes'.
"""

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import Boolean, String, or_, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from server.db import Base, Database, UtcDateTime, utc_now
from server.read_cache import ReadCache
from server.registry.errors import AdapterNotFoundError, NameConflictError
from server.registry.names import check_name

Kind = Literal["adapter", "alias", "experiment"]
_WHAT = {"adapter": "an adapter name", "alias": "an alias", "experiment": "an experiment name"}


class _NameRow(Base):
    __tablename__ = "names"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    tenant: Mapped[str | None] = mapped_column(String(64), index=True)
    public: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


@dataclass(frozen=True)
class Name:
    name: str
    kind: Kind
    tenant: str | None  # None: the admins'
    public: bool


class Namespace:
    """Thread-safe."""

    def __init__(self, db: Database, reserved: Collection[str] = ()):
        """`reserved`: names nobody may claim (the base model's)."""
        self._db = db
        self._reserved = frozenset(reserved)
        self._names: ReadCache[str, Name | None] = db.read_cache(["names"])

    def get(self, name: str) -> Name | None:
        return self._names.get(name, lambda: self._load(name))

    def check(self, name: str, kind: Kind, tenant: str | None) -> None:
        """Raise what `claim` would raise, without claiming (before reading a large upload for nothing)."""
        check_name(name, _label(kind))
        self._refuse(name, kind, tenant, self.get(name))

    def claim(self, session: Session, name: str, kind: Kind, tenant: str | None) -> None:
        """Take `name` for a `kind` thing of `tenant` (None: an admin) within the write transaction
        `session` that creates it; NameConflictError if the name is not available to it. The name's row
        stays locked until that transaction ends (PostgreSQL: FOR UPDATE; SQLite has one writer anyway),
        so everything written under one name is written one transaction after the other."""
        check_name(name, _label(kind))
        row = session.get(_NameRow, name, with_for_update=True)
        self._refuse(name, kind, tenant, _name(row) if row is not None else None)
        if row is None:
            session.add(_NameRow(name=name, kind=kind, tenant=tenant, public=False, created_at=utc_now()))

    def free(self, session: Session, name: str, kind: Kind) -> None:
        """Release an alias's or experiment's name within the transaction that deletes it."""
        row = session.get(_NameRow, name)
        if row is not None and row.kind == kind:
            session.delete(row)

    def set_public(self, name: str, public: bool) -> Name:
        """Make a name visible (usable, not changeable) to every tenant, or private again."""

        def work(session: Session) -> Name:
            row = session.get(_NameRow, name)
            if row is None:
                raise AdapterNotFoundError(f"{name!r} not found")
            row.public = public
            return _name(row)

        return self._db.write(work)

    def visible_to(self, tenant: str) -> set[str]:
        """Names the tenant owns or that are public."""
        query = select(_NameRow.name).where(or_(_NameRow.tenant == tenant, _NameRow.public.is_(True)))
        with self._db.read() as session:
            return set(session.scalars(query))

    def owned_by(self, tenant: str) -> set[str]:
        with self._db.read() as session:
            return set(session.scalars(select(_NameRow.name).where(_NameRow.tenant == tenant)))

    def _load(self, name: str) -> Name | None:
        with self._db.read() as session:
            row = session.get(_NameRow, name)
            return _name(row) if row is not None else None

    def _refuse(self, name: str, kind: Kind, tenant: str | None, taken: Name | None) -> None:
        if tenant is not None and (name in self._reserved or (taken is not None and taken.tenant != tenant)):
            raise NameConflictError(f"name {name!r} is not available")
        if name in self._reserved:
            raise NameConflictError(f"{name!r} is the base model's name")
        if taken is None:
            return
        if taken.kind != kind:
            what, taker = _WHAT[taken.kind], _label(kind, article=True)
            raise NameConflictError(f"{name!r} is {what}; {taker} may not take it")
        if kind == "experiment":
            raise NameConflictError(f"experiment {name!r} already exists")


def _label(kind: Kind, article: bool = False) -> str:
    label = {"adapter": "adapter name", "alias": "alias", "experiment": "experiment name"}[kind]
    return (("an " if label[0] in "aeiou" else "a ") + label) if article else label


def _name(row: _NameRow) -> Name:
    return Name(row.name, row.kind, row.tenant, row.public)  # type: ignore[arg-type]
