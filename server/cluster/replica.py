"""One engine replica of the cluster: the whole loraserve app (`server.api.app.create_app`, started
with its own lifespan) behind one Ray Serve method that plays a request into it (asgi_bridge)."""

import asyncio
import logging
import sys
from collections.abc import AsyncIterator

from ray import serve

from server.api.app import create_app
from server.cluster.asgi_bridge import REPLICA_HEADER, Envelope, play
from server.cluster.channel import Batch, ChannelHub
from server.cluster.replica_metrics import ReplicaMetrics
from server.config import Settings
from server.db.database import UNREACHABLE

log = logging.getLogger(__name__)

class EngineReplica:
    """Ray Serve builds it with `async __init__` (the model loads before the replica counts as running)
    and stops the engine in `__del__`."""

    async def __init__(self, settings: Settings):
        # As `loraserve serve` does: the engine thread should not wait 5 ms for the GIL between kernels.
        sys.setswitchinterval(0.0005)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._app = create_app(settings)
        self._stream_interval = settings.stream_interval
        self._channels = ChannelHub(flush_s=settings.stream_interval)
        self._lifespan = self._app.router.lifespan_context(self._app)
        await self._lifespan.__aenter__()
        self._headers = [(REPLICA_HEADER, self.replica_id.encode())]
        self._metrics = ReplicaMetrics()
        self._aliases: dict[str, str] = {}

    async def handle(self, envelope: Envelope):
        """Stream one HTTP request's answer: a `Start`, then body pieces (call with `stream=True`); an
        event stream's pieces go on the ingress's channel to this replica if the envelope names one."""
        channel = self._channels.sender(envelope.get("channels", {}).get(self.replica_id), envelope.get("key"))
        async for item in play(self._app, envelope, self._headers, flush_s=self._stream_interval, channel=channel):
            yield item

    async def channel(self, channel_id: str) -> AsyncIterator[str | Batch]:
        """An ingress's channel to this replica (server/cluster/channel.py; call with `stream=True`)."""
        async for batch in self._channels.serve(channel_id, self.replica_id):
            yield batch

    async def record_routing_stats(self) -> dict:
        """What the router reads (server/cluster/router.py): the adapters in the engine's device slots, by
        `name@version` and by name, and the alias table (alias -> `name@version`), so that an alias routes
        with its adapter. Also refreshes the exported metrics."""
        state = self._app.state.loraserve
        snap = state.engine.snapshot
        self._metrics.update(snap)
        held = set(snap.device_adapters) | set(snap.merged)
        try:
            aliases = await asyncio.to_thread(state.registry.list_aliases)
            self._aliases = {a.alias: a.target for a in aliases}
        except UNREACHABLE:  # the last table known; the replica serves on without its database
            log.debug("alias table not refreshed: the catalogue is unreachable")
        return {"adapters": sorted(held | {key.partition("@")[0] for key in held}), "aliases": self._aliases}

    def check_health(self) -> None:
        if self._app.state.loraserve is None:
            raise RuntimeError("the engine is not running")

    async def __del__(self):
        await self._lifespan.__aexit__(None, None, None)

