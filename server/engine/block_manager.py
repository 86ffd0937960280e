"""KV-cache blocks: a free list with reference counts, and the prefix cache over full blocks.

A full block is named by a hash chain: block i's hash covers the cache key of its sequence (the bare
base, or an adapter that changes keys and values: prefix_keys.py) and every token up to and including
the block, so equal hashes mean equal keys and values in every layer. When its last user lets go, a
named block stays in the cache, evictable; a request whose prompt starts with the same blocks takes
them (reference count + 1) and prefills only the rest. Blocks are evicted least recently released
first, and only when an allocation finds the free list empty: cached blocks count as free, so they
never hold back a running request.

Hashes are BLAKE2b digests, not Python's 64-bit `hash`: a tenant who could construct a colliding prompt
would read another tenant's cached keys and values.
"""

import hashlib
import math
from array import array
from collections import OrderedDict
from collections.abc import Callable, Hashable

BlockHash = bytes


def chain_hashes(tokens: list[int], block_size: int, cache_key: Hashable, known: list[BlockHash]) -> list[BlockHash]:
    """The hashes of every full block of `tokens`, extending `known` (the hashes of the first blocks,
    computed before) rather than hashing again from the start."""
    hashes = list(known)
    parent = hashes[-1] if hashes else repr(cache_key).encode()
    for start in range(len(hashes) * block_size, len(tokens) - block_size + 1, block_size):
        block = array("q", tokens[start:start + block_size]).tobytes()
        parent = hashlib.blake2b(parent + block, digest_size=16).digest()
        hashes.append(parent)
    return hashes


class BlockAllocator:
    """Blocks with reference counts; with `caching`, full blocks are kept after release and found by hash."""

    def __init__(self, num_blocks: int, block_size: int, caching: bool = False):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = caching
        self._free = list(range(num_blocks - 1, -1, -1))  # never named, or named and evicted
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, BlockHash] = {}
        self._block_of: dict[BlockHash, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # named blocks nobody holds, oldest first
        self._by_key: dict[Hashable, set[BlockHash]] = {}  # the hashes named under each cache key
        self._key_of: dict[BlockHash, Hashable] = {}
        self.evictions = 0

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Blocks the prefix cache can hand out (held by running requests or not)."""
        return len(self._block_of)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free

    def allocate(self, num_blocks: int) -> list[int]:
        if not self.can_allocate(num_blocks):
            raise RuntimeError(f"KV cache exhausted: {num_blocks} blocks asked, {self.num_free} free")
        blocks = [self._take_free() for _ in range(num_blocks)]
        for block in blocks:
            self._refs[block] = 1
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Let go of blocks; named ones stay cached. The last block of a sequence is released first, so
        a prompt's tail is evicted before its head (which more requests share)."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] > 0:
                continue
            if block in self._hash_of:
                self._evictable[block] = None
            else:
                self._free.append(block)

    # ---- the prefix cache -----------------------------------------------------------------------

    def cached_prefix(self, hashes: list[BlockHash]) -> list[int]:
        """The blocks holding the longest cached prefix of these block hashes (not yet taken)."""
        blocks = []
        for block_hash in hashes:
            block = self._block_of.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def blocks_to_take(self, blocks: list[int]) -> int:
        """Of these cached blocks, how many are free now (taking them uses up free blocks)."""
        return sum(1 for block in blocks if self._refs[block] == 0)

    def take(self, blocks: list[int]) -> None:
        """Hold cached blocks for one more sequence."""
        for block in blocks:
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1

    def name(self, block: int, block_hash: BlockHash, cache_key: Hashable) -> None:
        """Record that a full block holds the prefix `block_hash` of sequences under `cache_key`. When
        another block holds it already, that one stays the cached copy and this one is freed normally."""
        if self.caching and block_hash not in self._block_of and block not in self._hash_of:
            self._block_of[block_hash] = block
            self._hash_of[block] = block_hash
            self._by_key.setdefault(cache_key, set()).add(block_hash)
            self._key_of[block_hash] = cache_key

    def forget(self, matches: Callable[[Hashable], bool]) -> None:
        """Drop every cached block of the cache keys `matches` accepts: a removed adapter's blocks must
        never be found again, as its name may come back with other weights. Blocks still held are freed
        when released."""
        for cache_key in [key for key in self._by_key if matches(key)]:
            for block_hash in self._by_key.pop(cache_key):
                del self._key_of[block_hash]
                block = self._block_of.pop(block_hash)
                del self._hash_of[block]
                if block in self._evictable:
                    del self._evictable[block]
                    self._free.append(block)

    def forget_all(self) -> None:
        """Empty the prefix cache (benchmarks start each run cold)."""
        self.forget(lambda key: True)

    def _take_free(self) -> int:
        if self._free:
            return self._free.pop()
        block, _ = self._evictable.popitem(last=False)
        block_hash = self._hash_of.pop(block)
        del self._block_of[block_hash]
        key = self._key_of.pop(block_hash)
        self._by_key[key].discard(block_hash)
        if not self._by_key[key]:
            del self._by_key[key]
        self.evictions += 1
        return block
