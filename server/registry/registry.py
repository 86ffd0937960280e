"""AdapterRegistry: the one object the app talks to about adapters as data.

Ties the blob store (files), the catalogue (metadata) and the host cache (loaded adapters) together.
The order of an upload makes it atomic from the outside: stage the bytes to a private temporary,
validate them fully against the base, commit the blob (one rename), then add the catalogue row. A
failure before the row leaves nothing visible; a refused row removes the blob again (unless a live
version uses the same content); a crash between the rename and the row leaves an unreferenced blob,
which the next start sweeps once it is an hour old (a replica sharing the store may be between the two
steps of its own upload).

Blobs are garbage: deleting a version removes its blob once no live version uses it, so upload/delete
cycles leave the disk as it was. The store's lock (threads and processes: replicas share a store)
orders "commit blob + add row" against "delete rows + remove unused blobs", so a removal never races
an upload of the same content.
"""

import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Protocol

import torch

from server.errors import AdapterValidationError, LoraserveError
from server.lora.adapter import CONFIG_FILE, WEIGHTS_FILE, LoraAdapter, load_lora_adapter
from server.lora.targets import TargetModule
from server.db import STATE_DIR
from server.registry.blob_store import BlobStore, ByteSource, StagedBlob, key_of_directory
from server.registry.catalogue import Catalogue
from server.registry.errors import AdapterNotFoundError, PathNotAllowedError
from server.registry.host_cache import HostCache
from server.registry.names import parse_model_ref
from server.registry.records import AdapterMetadata, AdapterRecord, AdapterSource, AliasRecord, Page
from server.registry.single_flight import SingleFlight

log = logging.getLogger(__name__)

# An upload takes less than this between its first byte and its row: a temporary or an unreferenced blob
# older than that, in a store replicas share, is left by a crash.
_STALE_S = 3600.0


class Validator(Protocol):
    """Reads and fully validates a PEFT directory against the base; the adapter is named `name`.
    Raises AdapterValidationError listing every problem."""

    def __call__(self, directory: Path, name: str) -> LoraAdapter: ...


def validator_for(targets: dict[str, TargetModule], *, max_rank: int, dtype: torch.dtype) -> Validator:
    """The validator the app passes: load_lora_adapter against the engine's targets, rank limit, dtype."""

    def validate(directory: Path, name: str) -> LoraAdapter:
        return load_lora_adapter(directory, targets, name=name, max_rank=max_rank, dtype=dtype)

    return validate


@dataclass(frozen=True)
class Registration:
    record: AdapterRecord
    created: bool  # False: the newest version already held these exact files


@dataclass(frozen=True)
class DiscoveryReport:
    registered: tuple[AdapterRecord, ...]
    unchanged: tuple[AdapterRecord, ...]
    skipped: dict[str, str]  # directory name -> why


class AdapterRegistry:
    """Adapters as data. Thread-safe: the app may call it from worker threads."""

    def __init__(
        self,
        adapters_dir: Path,
        validator: Validator,
        catalogue: Catalogue,
        *,
        host_cache_bytes: int = 2 * 1024**3,
        max_upload_bytes: int = 1024**3,
    ):
        """Open (creating if needed) the blob store under `adapters_dir/.loraserve/`, removing temporaries
        a crash left; metadata goes to `catalogue` (server/db.open_database finds the default one)."""
        self.adapters_dir = Path(adapters_dir).resolve()
        state = self.adapters_dir / STATE_DIR
        state.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobStore(state)
        if cleaned := self.blobs.clean_temp(min_age_s=_STALE_S):
            log.info("removed %d temporary upload(s) left by an interrupted run", cleaned)
        self.catalogue = catalogue
        self.cache = HostCache(host_cache_bytes)
        self.max_upload_bytes = max_upload_bytes
        self._validate = validator
        self._loads = SingleFlight()
        if swept := self.sweep_unused_blobs():
            log.info("removed %d blob(s) that no live adapter version uses", swept)

    # ---- adding adapters ------------------------------------------------------------------------

    def upload(self, name: str, description: str, config_file: ByteSource, weights_file: ByteSource,
               source: AdapterSource = "upload", max_bytes: int | None = None,
               tenant: str | None = None) -> AdapterRecord:
        """Store a new version of `name` for `tenant` (None: an admin) from the two files' bytes (bytes,
        binary file objects or chunk iterables, read in chunks). Raises InvalidNameError,
        NameConflictError (the name is not available to the caller), UploadTooLargeError (above
        max_upload_bytes, or `max_bytes` when smaller), AdapterValidationError; on any of them nothing
        is stored."""
        self.catalogue.check_adapter_name(name, tenant)  # before reading a large body for nothing
        limit = self.max_upload_bytes if max_bytes is None else min(max_bytes, self.max_upload_bytes)
        staged = self.blobs.stage(config_file, weights_file, limit)
        return self._add(name, staged, description, source, tenant)

    def register_directory(self, name: str, path: Path, source: AdapterSource = "disk") -> Registration:
        """Copy an existing PEFT directory into the store as a new version of `name`, an admins' name
        (same checks as upload). Idempotent: if the newest live version holds the same files, nothing
        is added."""
        self.catalogue.check_adapter_name(name)
        path = Path(path)
        missing = [f"{f}: missing in {path}" for f in (CONFIG_FILE, WEIGHTS_FILE) if not (path / f).is_file()]
        if missing:
            raise AdapterValidationError(missing)
        latest = self.catalogue.latest(name)
        if latest is not None and latest.blob_key == key_of_directory(path):
            return Registration(latest, created=False)
        with open(path / CONFIG_FILE, "rb") as config, open(path / WEIGHTS_FILE, "rb") as weights:
            staged = self.blobs.stage(config, weights, self.max_upload_bytes)
        return Registration(self._add(name, staged, "", source), created=True)

    def discover(self) -> DiscoveryReport:
        """Register every subdirectory of adapters_dir (not starting with '.') that holds an
        adapter_config.json, under the directory's name. Invalid ones are logged and skipped, never
        fatal. A directory whose files equal its name's newest version, deleted through the API, is
        skipped too: deleting must not be undone by a restart."""
        registered, unchanged, skipped = [], [], {}
        for entry in sorted(self.adapters_dir.iterdir()):
            if entry.name.startswith(".") or not (entry / CONFIG_FILE).is_file():
                continue
            try:
                if self._deleted_through_api(entry):
                    skipped[entry.name] = "deleted through the API; change the directory to add it again"
                    continue
                registration = self.register_directory(entry.name, entry, source="disk")
            except (LoraserveError, OSError) as exc:
                skipped[entry.name] = str(exc)
                log.warning("adapter directory %s skipped: %s", entry, exc)
                continue
            (registered if registration.created else unchanged).append(registration.record)
        return DiscoveryReport(tuple(registered), tuple(unchanged), skipped)

    def load_from_path(self, name: str, path: str | Path) -> AdapterRecord:
        """vLLM's `load_lora_adapter`: register a directory given by a client. `path` is taken relative
        to adapters_dir; PathNotAllowedError if it, or either adapter file, resolves (after symlinks)
        outside adapters_dir."""
        directory = (self.adapters_dir / path).resolve()  # an absolute `path` replaces the base
        resolved = [directory, *((directory / f).resolve() for f in (CONFIG_FILE, WEIGHTS_FILE))]
        if directory == self.adapters_dir or not all(p.is_relative_to(self.adapters_dir) for p in resolved):
            raise PathNotAllowedError(f"{str(path)!r}: adapters load only from inside the adapters directory")
        return self.register_directory(name, directory, source="disk").record

    # ---- reading --------------------------------------------------------------------------------

    def resolve(self, model: str) -> AdapterRecord:
        """alias -> its version, `name@version` -> that version, `name` -> the newest live version.
        AdapterNotFoundError for unknown or deleted ones."""
        return self.catalogue.resolve(model)

    def load(self, record: AdapterRecord) -> LoraAdapter:
        """The validated adapter of `record`, named `record.key`: from the host cache, or read from the
        blob store and validated. Blocking (run it in a worker thread); concurrent loads of one key do
        the work once."""
        return self.cached(record) or self.read(record)

    def cached(self, record: AdapterRecord) -> LoraAdapter | None:
        """The adapter if host memory holds it (a hit makes it the most recently used), else None."""
        return self.cache.get(record.key)

    def read(self, record: AdapterRecord) -> LoraAdapter:
        """Read and validate from the blob store into host memory, however many ask at once. Blocking."""
        return self._loads.run(record.key, lambda: self._read(record))

    def get(self, name: str) -> list[AdapterRecord]:
        """Every live version of `name`, oldest first; AdapterNotFoundError if there is none."""
        versions = self.catalogue.versions(name)
        if not versions:
            raise AdapterNotFoundError(f"adapter {name!r} not found")
        return versions

    def tier_of(self, key: str) -> Literal["host", "disk"]:
        """Where the adapter `name@version` lives closest to the device, as far as the registry knows."""
        return "host" if key in self.cache else "disk"

    # ---- deleting and aliases -------------------------------------------------------------------

    def delete(self, name: str, version: int | None = None) -> list[AdapterRecord]:
        """Soft-delete one version or all live versions of `name` and drop them from the host cache
        (the engine's device copies are the app's to drop). AdapterNotFoundError if none was live."""
        with self.blobs.lock():
            deleted = self.catalogue.delete(name, version)
            self._remove_unused({record.blob_key for record in deleted})
        for record in deleted:
            self.cache.evict(record.key)
        return deleted

    def sweep_unused_blobs(self, min_age_s: float = _STALE_S) -> int:
        """Remove blobs no live version uses that were committed at least `min_age_s` ago (younger ones
        may belong to an upload between its blob and its row, in a replica sharing the store)."""
        cutoff = time.time() - min_age_s
        with self.blobs.lock():
            old = {key for key, committed in self.blobs.keys().items() if committed <= cutoff}
            return self._remove_unused(old)

    def set_alias(self, alias: str, target: str, tenant: str | None = None) -> AliasRecord:
        """Point `alias` (a name of `tenant`, None: an admin) at `name@version`, or at the newest live
        version for a bare `name` (pinned then: later versions do not move it)."""
        ref = parse_model_ref(target)
        return self.catalogue.set_alias(alias, ref.name, ref.version, tenant)

    def get_alias(self, alias: str) -> AliasRecord:
        return self.catalogue.get_alias(alias)

    def delete_alias(self, alias: str) -> AliasRecord:
        return self.catalogue.delete_alias(alias)

    def list_aliases(self) -> list[AliasRecord]:
        return self.catalogue.list_aliases()

    # ---- internals ------------------------------------------------------------------------------

    def _add(self, name: str, staged: StagedBlob, description: str, source: AdapterSource,
             tenant: str | None = None) -> AdapterRecord:
        try:
            adapter = self._validate(staged.directory, name=name)
            with self.blobs.lock():
                self.blobs.commit(staged)
                try:
                    record = self.catalogue.add_version(name, _metadata(adapter, staged, description, source),
                                                        tenant)
                except BaseException:
                    self._remove_unused({staged.key})
                    raise
        finally:
            self.blobs.discard(staged)  # after a commit the temporary is already gone
        # The version is known only now: rename the validated adapter to the key the engine uses.
        self.cache.put(replace(adapter, name=record.key))
        return record

    def _remove_unused(self, keys: set[str]) -> int:
        """Remove those of `keys` that no live version uses (call with the blob lock held)."""
        unused = keys - self.catalogue.live_blob_keys(keys) if keys else set()
        for key in unused:
            self.blobs.remove(key)
        return len(unused)

    def _read(self, record: AdapterRecord) -> LoraAdapter:
        cached = self.cache.peek(record.key)  # a load that finished since our miss left it here
        if cached is not None:
            return cached
        started = time.perf_counter()
        adapter = self._validate(self.blobs.path(record.blob_key), name=record.key)
        self.cache.record_load(time.perf_counter() - started)
        self.cache.put(adapter)
        return adapter

    def _deleted_through_api(self, directory: Path) -> bool:
        newest = self.catalogue.latest(directory.name, include_deleted=True)
        return newest is not None and newest.deleted and newest.blob_key == key_of_directory(directory)

    # Last in the class body: a method named `list` would shadow the builtin in later annotations.
    def list(self, limit: int = 50, offset: int = 0, only: "Collection[str] | None" = None) -> Page:
        """Adapter names (among `only`, if given) with their live versions, ordered by name, one page of
        them and the total."""
        return self.catalogue.list_adapters(limit, offset, only)


    def latest_versions(self) -> "list[AdapterRecord]":  # `list` is a method name in this class
        """The newest live version of every adapter, by name."""
        records, offset = [], 0
        while True:
            page = self.catalogue.list_adapters(limit=500, offset=offset)
            records += [summary.latest for summary in page.items]
            offset += len(page.items)
            if not page.items or offset >= page.total:
                return records

def _metadata(
    adapter: LoraAdapter, staged: StagedBlob, description: str, source: AdapterSource
) -> AdapterMetadata:
    """What the catalogue keeps about a validated adapter. A is (r, d_in) and B is (d_out, r), so the
    adapted base matrix has d_in·d_out parameters."""
    weights = adapter.modules.values()
    return AdapterMetadata(
        blob_key=staged.key,
        weights_sha256=staged.weights_sha256,
        description=description,
        rank=adapter.max_rank,
        alpha=adapter.spec.lora_alpha,
        target_modules=tuple(sorted({module.rsplit(".", 1)[-1] for module in adapter.modules})),
        use_dora=adapter.spec.use_dora,
        use_rslora=adapter.spec.use_rslora,
        trainable_params=adapter.trainable_parameters,
        adapted_base_params=sum(w.lora_a.shape[1] * w.lora_b.shape[0] for w in weights),
        size_bytes=staged.size_bytes,
        source=source,
    )
