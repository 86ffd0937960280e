"""Plain, frozen records the catalogue hands out: callers never hold an ORM object or a session."""

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from server.registry.names import adapter_key

AdapterSource = Literal["upload", "disk", "cli"]


@dataclass(frozen=True)
class AdapterMetadata:
    """What is known about a validated adapter before it gets a name and a version."""

    blob_key: str
    weights_sha256: str
    description: str
    rank: int  # the largest rank of any module
    alpha: float
    target_modules: tuple[str, ...]  # module suffixes, e.g. ("q_proj", "v_proj")
    use_dora: bool
    use_rslora: bool
    trainable_params: int  # sum of r·(d_in + d_out)
    adapted_base_params: int  # sum of d_in·d_out of the adapted base matrices
    size_bytes: int  # both files on disk
    source: AdapterSource


@dataclass(frozen=True)
class AdapterRecord(AdapterMetadata):
    """One immutable version of a named adapter."""

    name: str
    version: int
    created_at: datetime  # UTC
    deleted_at: datetime | None = None

    @property
    def key(self) -> str:
        """`name@version`: the adapter's name in the host cache and in the engine."""
        return adapter_key(self.name, self.version)

    @property
    def deleted(self) -> bool:
        return self.deleted_at is not None


@dataclass(frozen=True)
class AliasRecord:
    """A stable name pinned to one adapter version (e.g. `prod` -> `support-bot@3`)."""

    alias: str
    name: str
    version: int
    created_at: datetime
    updated_at: datetime

    @property
    def target(self) -> str:
        return adapter_key(self.name, self.version)


@dataclass(frozen=True)
class AdapterSummary:
    """A name with its live versions, newest last, and the newest one's record."""

    name: str
    versions: tuple[int, ...]
    latest: AdapterRecord


@dataclass(frozen=True)
class Page:
    """One page of adapter names, ordered by name, and how many names there are in all."""

    items: tuple[AdapterSummary, ...]
    total: int
    limit: int
    offset: int
