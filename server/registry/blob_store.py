"""Content-addressed adapter files: `root/blobs/<key>/{adapter_config.json, adapter_model.safetensors}`.

key = sha256(sha256(config) ‖ sha256(weights)), over the raw 32-byte digests, in hex: two adapters share a
blob exactly when both files are byte-identical. Writes go to a temporary directory under `root/tmp/`,
are fsynced, and become visible with one rename of the whole directory, so no reader ever sees half a blob;
a crash leaves only temporaries, which `clean_temp` removes at start-up.

Several processes may share one store (replicas of `loraserve cluster` on one volume): `lock()` is held
by whoever commits a blob and adds its row, or deletes rows and removes blobs no row uses, in every
process, so a removal never races another replica's upload of the same content.
"""

import contextlib
import fcntl

import hashlib
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from server.lora.adapter import CONFIG_FILE, WEIGHTS_FILE
from server.registry.errors import UploadTooLargeError

CHUNK_BYTES = 1 << 20
_KEY = re.compile(r"^[0-9a-f]{64}$")

# Bytes already in memory, a binary file-like object (read(n)), or an iterable of chunks.
ByteSource = bytes | BinaryIO | Iterable[bytes]


@dataclass(frozen=True)
class StagedBlob:
    """Files written to a private temporary directory, not yet visible in the store."""

    directory: Path
    key: str
    weights_sha256: str
    size_bytes: int  # both files together


class BlobStore:
    """Adapter files on disk, addressed by content. Safe to use from several threads and processes."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.tmp = self.root / "tmp"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._lock_file = self.root / "blobs.lock"
        self._thread_lock = threading.Lock()  # flock is per open file: threads of one process queue here

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """The store's one lock across threads and processes (an exclusive flock on `blobs.lock`)."""
        with self._thread_lock, open(self._lock_file, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def path(self, key: str) -> Path:
        """The directory of a committed blob; a key that is not 64 hex digits is a ValueError."""
        if not _KEY.fullmatch(key):
            raise ValueError(f"not a blob key: {key!r}")  # keys may come from a shared catalogue: no paths
        return self.blobs / key

    def exists(self, key: str) -> bool:
        return self.path(key).is_dir()

    def clean_temp(self, min_age_s: float = 0.0) -> int:
        """Remove leftover temporaries (from a crash mid-upload) last changed `min_age_s` ago or more;
        return how many. Call at start-up: a store shared with running replicas holds their uploads in
        progress too, so give them an age no upload takes."""
        cutoff = time.time() - min_age_s
        entries = [entry for entry in self.tmp.iterdir() if entry.lstat().st_mtime <= cutoff]
        for entry in entries:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        return len(entries)

    def stage(self, config: ByteSource, weights: ByteSource, max_bytes: int) -> StagedBlob:
        """Copy both files into a temporary directory, hashing as they stream; refuse (UploadTooLargeError,
        nothing left behind) as soon as more than `max_bytes` arrived in total."""
        directory = Path(tempfile.mkdtemp(prefix="stage-", dir=self.tmp))
        try:
            budget = _Budget(max_bytes)
            config_digest = _copy(config, directory / CONFIG_FILE, budget)
            weights_digest = _copy(weights, directory / WEIGHTS_FILE, budget)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        key = hashlib.sha256(config_digest + weights_digest).hexdigest()
        return StagedBlob(directory, key, weights_digest.hex(), budget.used)

    def commit(self, staged: StagedBlob) -> str:
        """Make a staged blob visible under its key with one atomic rename; return the key. If the key
        exists already the content is identical, so the temporary is simply dropped."""
        target = self.path(staged.key)
        try:
            os.rename(staged.directory, target)
        except OSError:
            if not target.is_dir():
                raise
            self.discard(staged)  # another writer committed the same content first
            return staged.key
        _fsync_directory(self.blobs)  # the rename itself must survive a power cut
        return staged.key

    def discard(self, staged: StagedBlob) -> None:
        shutil.rmtree(staged.directory, ignore_errors=True)

    def remove(self, key: str) -> None:
        """Delete a committed blob: renamed into tmp/ first (one atomic step: no reader sees half of it),
        then removed. Removing a blob that is not there does nothing."""
        doomed = Path(tempfile.mkdtemp(prefix="remove-", dir=self.tmp))
        try:
            os.rename(self.path(key), doomed / key)
        except FileNotFoundError:
            pass
        shutil.rmtree(doomed, ignore_errors=True)

    def keys(self) -> dict[str, float]:
        """Every committed blob's key with the time it was committed (its directory's mtime)."""
        return {entry.name: entry.stat().st_mtime for entry in self.blobs.iterdir() if _KEY.fullmatch(entry.name)}

    def size_bytes(self) -> int:
        """Bytes of every committed blob's files."""
        return sum(f.stat().st_size for f in self.blobs.glob("*/*") if f.is_file())


def key_of_directory(directory: Path) -> str:
    """The key a PEFT directory's two files would be stored under, read in chunks, nothing copied."""
    digests = []
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        digest = hashlib.sha256()
        with open(Path(directory) / name, "rb") as f:
            for chunk in _chunks(f):
                digest.update(chunk)
        digests.append(digest.digest())
    return hashlib.sha256(b"".join(digests)).hexdigest()


class _Budget:
    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def take(self, n: int) -> None:
        self.used += n
        if self.used > self.limit:
            raise UploadTooLargeError(f"adapter files exceed the maximum upload size of {self.limit} bytes")


def _chunks(source: ByteSource) -> Iterator[bytes]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        yield bytes(source)
    elif hasattr(source, "read"):
        while chunk := source.read(CHUNK_BYTES):
            yield chunk
    else:
        yield from source


def _copy(source: ByteSource, path: Path, budget: _Budget) -> bytes:
    """Write `source` to `path` (fsynced) within the budget; return its sha256 digest."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in _chunks(source):
            budget.take(len(chunk))
            digest.update(chunk)
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    return digest.digest()


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
