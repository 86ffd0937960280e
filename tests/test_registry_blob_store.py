"""The blob store: content addressing, atomic commits, bounded streaming, clean-up after a crash."""

import hashlib
import io

import pytest

from server.lora.adapter import CONFIG_FILE, WEIGHTS_FILE
from server.registry.blob_store import BlobStore, key_of_directory
from server.registry.errors import UploadTooLargeError

CONFIG, WEIGHTS = b'{"r": 8}', b"\x00\x01" * 1000


def _expected_key(config: bytes, weights: bytes) -> str:
    return hashlib.sha256(hashlib.sha256(config).digest() + hashlib.sha256(weights).digest()).hexdigest()


def test_staged_files_are_invisible_until_commit(tmp_path):
    store = BlobStore(tmp_path)
    staged = store.stage(CONFIG, io.BytesIO(WEIGHTS), max_bytes=10_000)
    assert staged.key == _expected_key(CONFIG, WEIGHTS)
    assert staged.weights_sha256 == hashlib.sha256(WEIGHTS).hexdigest()
    assert staged.size_bytes == len(CONFIG) + len(WEIGHTS)
    assert not store.exists(staged.key) and list(store.blobs.iterdir()) == []

    assert store.commit(staged) == staged.key
    assert (store.path(staged.key) / WEIGHTS_FILE).read_bytes() == WEIGHTS
    assert (store.path(staged.key) / CONFIG_FILE).read_bytes() == CONFIG
    assert list(store.tmp.iterdir()) == []
    assert key_of_directory(store.path(staged.key)) == staged.key


def test_identical_content_is_stored_once(tmp_path):
    store = BlobStore(tmp_path)
    first = store.commit(store.stage(CONFIG, WEIGHTS, 10_000))
    second = store.commit(store.stage(CONFIG, [WEIGHTS[:7], WEIGHTS[7:]], 10_000))  # chunks: same bytes
    other = store.commit(store.stage(b'{"r": 4}', WEIGHTS, 10_000))
    assert first == second != other
    assert sorted(p.name for p in store.blobs.iterdir()) == sorted([first, other])
    assert list(store.tmp.iterdir()) == []


def test_size_limit_stops_the_copy_while_streaming(tmp_path):
    store = BlobStore(tmp_path)
    pulled = []

    def endless():
        while True:
            pulled.append(1)
            yield b"x" * 100

    with pytest.raises(UploadTooLargeError, match="1000 bytes"):
        store.stage(CONFIG, endless(), max_bytes=1000)
    assert len(pulled) == 10  # stopped at the first chunk past the limit (8 + 10·100 > 1000)
    assert list(store.tmp.iterdir()) == [] and list(store.blobs.iterdir()) == []


def test_limit_counts_both_files(tmp_path):
    store = BlobStore(tmp_path)
    store.stage(CONFIG, WEIGHTS, max_bytes=len(CONFIG) + len(WEIGHTS))  # exactly at the limit: fine
    with pytest.raises(UploadTooLargeError):
        store.stage(CONFIG, WEIGHTS, max_bytes=len(CONFIG) + len(WEIGHTS) - 1)


def test_clean_temp_removes_what_a_crash_left(tmp_path):
    store = BlobStore(tmp_path)
    store.stage(CONFIG, WEIGHTS, 10_000)  # staged, never committed: the process "died" here
    (store.tmp / "partial.bin").write_bytes(b"half")
    kept = store.commit(store.stage(b"{}", WEIGHTS, 10_000))
    assert store.clean_temp() == 2
    assert list(store.tmp.iterdir()) == []
    assert store.exists(kept)


@pytest.mark.parametrize("key", ["../x", "a" * 63, "A" * 64, "/etc"])
def test_only_hex_keys_name_a_path(tmp_path, key):
    with pytest.raises(ValueError):
        BlobStore(tmp_path).path(key)
