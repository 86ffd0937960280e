"""One Ray stream per (ingress, replica) for the events of every streamed answer between them.

Ray Serve costs CPU per streamed item on both ends (gRPC wrappers, pickling, metrics): with one Ray
stream per request, every SSE event of every request is an item, and the replica pays for it on the core
its engine needs. A channel carries the events of all of a replica's streamed answers to one ingress as
batches: one item per gather (`--stream-interval`) instead of one per event per request.

- The ingress opens a channel to every replica its router sees running (`replicas_now`, called by the
  routers of server/cluster/router.py) and to any replica that answers without one (`ChannelClient.ensure`),
  pinned to it through the router (`PIN` + replica id as the multiplexed model id). The channel's first
  item, the replica's id, says it is open and where (one that lands elsewhere is closed at once: the
  routers pin it, and the tests see a misplaced one as a missing channel). Every request's envelope names the channels open when it is sent (`channels`:
  replica id -> channel id) and a key of its own (`key`).
- A replica whose channel a request names sends that answer's body through the channel (`ChannelHub`)
  when the answer is an event stream, and marks its `Start` `via_channel`; the request's own Ray stream
  stays open until the answer ends (it carries the cancellation when the client leaves, Ray's count of
  requests in flight, and the replica's death). A body's end is a `None` piece.
- A channel is one request in flight on its replica for as long as the replica runs, the same one on
  every replica, so the routers' load comparisons are unchanged. When the router stops seeing a replica
  (it is draining, or gone), new requests stop naming its channel, and the ingress closes it once no request
  that named it is left, so the replica's drain can end.
- A channel that fails (the replica died) fails every answer on it: the ingress ends them with an error
  event, as when a request's own stream fails.
- Ray does not end a stream whose caller died (a `loraserve cluster` killed outright while the Ray cluster it
  joined runs on), so a replica ends a channel that no request has named and no answer has used for `LEASE_S`
  (a lease that traffic renews: renewing by Ray calls of their own skewed the routers' queue-length caches).
  The ingress opens it again with the next answer from that replica.
"""

import asyncio
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

PIN = "@replica:"  # a multiplexed model id starting so routes to that replica only (server/cluster/router.py)
OPEN_TIMEOUT_S = 10.0  # the pinned replica may be gone: the router would wait for it forever
Batch = list[tuple[str, bytes | None]]  # (request key, body piece); None ends that request's body
LEASE_S = 60.0  # a replica ends a channel that no request has named and no answer has used for this long


class ChannelLost(ConnectionError):
    """The channel carrying an answer (or the answer's own stream) failed before the answer's end."""

    def __init__(self, reason: str, channel_id: str | None = None):
        super().__init__(reason)
        self.channel_id = channel_id  # None: whichever channel the answer rides


@dataclass
class _Open:
    # None: the lease ran out
    queue: asyncio.Queue[tuple[str, bytes | None] | None] = field(default_factory=asyncio.Queue)
    closed: bool = False
    renewed: float = field(default_factory=time.monotonic)  # named by a request, or an answer on it ended
    answers: int = 0  # on it now


class ChannelSender:
    """One answer's way into a channel, if the channel is still open when the answer starts."""

    def __init__(self, channel: _Open, key: str):
        self._channel, self._key, self._started = channel, key, False

    def start(self) -> bool:
        """Claim the channel for this answer; False if it closed meanwhile (send on the request's stream)."""
        self._started = not self._channel.closed
        if self._started:
            self._channel.answers += 1
        return self._started

    def send(self, piece: bytes) -> None:
        self._channel.queue.put_nowait((self._key, piece))

    def end(self) -> None:
        if self._started:
            self._started = False
            self._channel.answers -= 1
            self._channel.renewed = time.monotonic()
            self._channel.queue.put_nowait((self._key, None))


class ChannelHub:
    """The replica's end: the channels ingresses opened to it."""

    def __init__(self, flush_s: float, lease_s: float = LEASE_S):
        self._flush_s = flush_s
        self._lease_s = lease_s
        self._open: dict[str, _Open] = {}

    def sender(self, channel_id: str | None, key: str | None) -> ChannelSender | None:
        """The way into the channel a request names, if it is open here (its lease starts again)."""
        channel = self._open.get(channel_id) if channel_id and key else None
        if channel is None:
            return None
        channel.renewed = time.monotonic()
        return ChannelSender(channel, key)

    async def serve(self, channel_id: str, replica_id: str) -> AsyncIterator[str | Batch]:
        """The channel's stream: `replica_id` at once, then what the answers on it send, gathered for
        `flush_s`, until the ingress closes it."""
        channel = self._open[channel_id] = _Open()
        watch = asyncio.ensure_future(self._expire(channel))
        try:
            yield replica_id
            expired = False
            while not expired and (first := await channel.queue.get()) is not None:
                if self._flush_s:
                    await asyncio.sleep(self._flush_s)
                batch = [first]
                while not channel.queue.empty():
                    if (item := channel.queue.get_nowait()) is None:
                        expired = True
                        break
                    batch.append(item)
                yield batch
            log.info("channel %s ended: unused for %.0f s", channel_id, self._lease_s)
        finally:
            watch.cancel()
            channel.closed = True
            self._open.pop(channel_id, None)

    async def _expire(self, channel: _Open) -> None:
        """Close `channel` once its lease runs out with no answer on it: closed at once, so that no answer
        starts on it after its end (None) is queued."""
        while (left := channel.renewed + self._lease_s - time.monotonic()) > 0 or channel.answers:
            await asyncio.sleep(left if left > 0 else self._lease_s / 4)
        channel.closed = True
        channel.queue.put_nowait(None)


_clients: "weakref.WeakSet[ChannelClient]" = weakref.WeakSet()


def replicas_now(replica_ids: set[str]) -> None:
    """The replicas this process's router sees running (from any thread): the ingresses here follow them."""
    for client in list(_clients):
        client.replicas_now(replica_ids)


class ChannelClient:
    """The ingress's end: one channel per running replica, and a mailbox per answer."""

    def __init__(self, replicas):
        self._replicas = replicas  # a DeploymentHandle of EngineReplica
        self._loop: asyncio.AbstractEventLoop | None = None  # the ingress's, from its first request
        self._running: set[str] | None = None  # as the router last said
        self._open: dict[str, str] = {}  # replica id -> channel id that new requests may name
        self._streams: dict[str, object] = {}  # channel id -> its Ray stream, until it ends
        self._readers: set[str] = set()  # replicas with a channel open or opening
        self._holding: dict[str, set[str]] = {}  # channel id -> keys of the requests that named it, until known
        self._mailboxes: dict[str, asyncio.Queue[bytes | None | ChannelLost]] = {}
        self._tasks: set[asyncio.Task] = set()
        _clients.add(self)

    def open_channels(self) -> dict[str, str]:
        return dict(self._open)

    def prepare(self) -> tuple[str, dict[str, str]]:
        """A key for a request about to be sent, with its mailbox (before any piece can arrive for it),
        and the channels its envelope names."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            if self._running is not None:
                self._follow(self._running)
        key = uuid.uuid4().hex
        self._mailboxes[key] = asyncio.Queue()
        for channel_id in self._open.values():
            self._holding.setdefault(channel_id, set()).add(key)
        return key, dict(self._open)

    def release(self, key: str, keep: str | None = None) -> None:
        """The request `key` uses no channel but `keep` (its mailbox goes too unless it keeps one)."""
        for channel_id, keys in list(self._holding.items()):
            if channel_id != keep and key in keys:
                keys.discard(key)
                self._close_if_retired(channel_id)
        if keep is None:
            self._mailboxes.pop(key, None)

    def ensure(self, replica_id: str) -> None:
        """Open a channel to `replica_id` in the background unless one is open or opening."""
        if replica_id not in self._open and replica_id not in self._readers:
            self._readers.add(replica_id)
            task = asyncio.get_running_loop().create_task(self._read(replica_id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Close every channel and wait (briefly) for the replicas to hear it: Ray does not end a stream
        whose caller is gone, and a channel left open would hold its replica's drain to its time limit."""
        _clients.discard(self)  # a process may run another ingress after this one (a benchmark does)
        self._open.clear()
        for stream in self._streams.values():
            stream.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)

    def replicas_now(self, replica_ids: set[str]) -> None:
        self._running = set(replica_ids)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._follow, self._running)

    async def relay(self, key: str, channel_id: str, own_stream) -> AsyncIterator[bytes]:
        """The body of the answer `key` as it arrives on `channel_id`; raises ChannelLost if the channel or
        the request's own stream (`own_stream`, which ends with the answer) fails first."""
        mailbox = self._mailboxes[key]
        self.release(key, keep=channel_id)
        if channel_id not in self._streams:  # it failed between the replica's claim and now
            mailbox.put_nowait(ChannelLost("the channel closed"))
        watch = asyncio.ensure_future(_until_end(own_stream))
        watch.add_done_callback(lambda done: done.cancelled() or done.exception() is None
                                or mailbox.put_nowait(ChannelLost(repr(done.exception()))))
        try:
            while (piece := await mailbox.get()) is not None:
                if not isinstance(piece, ChannelLost):
                    yield piece
                elif piece.channel_id in (None, channel_id):  # not another channel this request named
                    raise piece
        finally:
            watch.cancel()
            own_stream.cancel()  # if the client left first, the replica's answer stops (it has ended otherwise)
            self.release(key)

    def _follow(self, running: set[str]) -> None:
        for replica_id in [r for r in self._open if r not in running]:  # draining or gone: named no more
            self._close_if_retired(self._open.pop(replica_id))
        for replica_id in running:
            self.ensure(replica_id)

    def _close_if_retired(self, channel_id: str) -> None:
        if channel_id not in self._open.values() and not self._holding.get(channel_id):
            self._holding.pop(channel_id, None)
            if (stream := self._streams.get(channel_id)) is not None:
                stream.cancel()

    async def _read(self, replica_id: str) -> None:
        channel_id = uuid.uuid4().hex
        stream = self._replicas.options(stream=True, multiplexed_model_id=PIN + replica_id).channel.remote(channel_id)
        self._streams[channel_id] = stream
        try:
            if await asyncio.wait_for(stream.__anext__(), OPEN_TIMEOUT_S) != replica_id:  # misplaced
                return
            if self._running is not None and replica_id not in self._running:  # it would hold the drain
                return
            self._open[replica_id] = channel_id
            async for batch in stream:
                for key, piece in batch:
                    if (mailbox := self._mailboxes.get(key)) is not None:
                        mailbox.put_nowait(piece)
        except Exception as exc:  # noqa: BLE001 - closed, the replica died, or never answered
            log.info("channel to replica %s ended: %r", replica_id, exc)
        finally:
            self._readers.discard(replica_id)  # one reader per replica: no other channel of it is open
            if self._open.get(replica_id) == channel_id:
                del self._open[replica_id]
            del self._streams[channel_id]
            stream.cancel()
            for key in self._holding.pop(channel_id, ()):
                if (mailbox := self._mailboxes.get(key)) is not None:
                    mailbox.put_nowait(ChannelLost("the channel to the replica ended", channel_id))


async def _until_end(stream) -> None:
    async for _ in stream:  # a request answered on a channel sends nothing more on its own stream
        pass
