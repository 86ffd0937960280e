"""The replica's end of a channel (server/cluster/channel.py) with the ASGI bridge, without Ray: an event
stream's body goes into the channel the request names, gathered with the other streams' events; a plain
body, or a channel that closed, stays on the request's own stream. The ingress's end runs on a real Ray
cluster in tests/test_cluster.py."""

import asyncio

from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from server.cluster.asgi_bridge import Start, play
from server.cluster.channel import ChannelHub

EVENTS = 5


async def _events(request):
    async def body():
        for i in range(EVENTS):
            yield f"data: {request.path_params['name']}-{i}\n\n"
            await asyncio.sleep(0.01)
    return StreamingResponse(body(), media_type="text/event-stream")


async def _plain(request):
    return JSONResponse({"plain": True})


APP = Starlette(routes=[Route("/events/{name}", _events), Route("/plain", _plain)])


def _envelope(path: str) -> dict:
    return {"method": "GET", "path": path, "query_string": b"", "headers": [], "body": b"", "client": None}


async def _answer(hub: ChannelHub, channel_id: str | None, key: str, path: str) -> list:
    sender = hub.sender(channel_id, key)
    return [item async for item in play(APP, _envelope(path), [(b"x-replica", b"r1")], channel=sender)]


def test_event_streams_come_on_the_channel_gathered_and_plain_bodies_on_their_own_stream():
    async def scenario():
        hub = ChannelHub(flush_s=0.05)
        channel = hub.serve("c1", "r1")
        assert await channel.__anext__() == "r1"  # open, and where
        collected: list = []
        batches = asyncio.ensure_future(_collect(channel, collected))
        own = await asyncio.gather(_answer(hub, "c1", "a", "/events/a"), _answer(hub, "c1", "b", "/events/b"),
                                   _answer(hub, "c1", "p", "/plain"))
        await asyncio.sleep(0.1)  # the last gather
        batches.cancel()
        return own, collected

    own, collected = asyncio.run(scenario())
    (start_a, *rest_a), (start_b, *rest_b), (start_p, *rest_p) = own
    assert isinstance(start_a, Start) and start_a.via_channel and rest_a == []
    assert start_b.via_channel and rest_b == []
    assert not start_p.via_channel and b"".join(rest_p) == b'{"plain":true}'
    assert (b"x-replica", b"r1") in start_a.headers
    pieces = {"a": [], "b": []}
    for batch in collected:
        for key, piece in batch:
            pieces[key].append(piece)
    for name in ("a", "b"):
        assert pieces[name][-1] is None  # the body's end
        assert b"".join(pieces[name][:-1]).decode() == "".join(f"data: {name}-{i}\n\n" for i in range(EVENTS))
    assert len(collected) < 2 * EVENTS  # gathered: fewer Ray items than events


async def _collect(channel, into: list) -> None:
    async for batch in channel:
        into.append(batch)


def test_a_request_naming_a_channel_the_replica_no_longer_has_answers_on_its_own_stream():
    async def scenario():
        hub = ChannelHub(flush_s=0.0)
        channel = hub.serve("c1", "r1")
        await channel.__anext__()
        await channel.aclose()  # the ingress closed it
        unknown = await _answer(hub, "c2", "x", "/events/x")
        closed = await _answer(hub, "c1", "y", "/events/y")
        return unknown, closed

    for start, *rest in asyncio.run(scenario()):
        assert not start.via_channel
        assert b"".join(rest).count(b"data: ") == EVENTS


def test_a_channel_unused_for_its_lease_ends_and_one_in_use_stays():
    """Ray does not end a stream whose caller died: the lease does (server/cluster/channel.py)."""
    async def scenario():
        hub = ChannelHub(flush_s=0.0, lease_s=0.3)
        channels = {name: hub.serve(name, "r1") for name in ("named", "busy", "idle")}
        for channel in channels.values():
            assert await channel.__anext__() == "r1"
        answer = hub.sender("busy", "long")
        assert answer.start()  # an answer on "busy" that outlasts the lease
        pending = {name: asyncio.ensure_future(channel.__anext__()) for name, channel in channels.items()}
        for _ in range(8):  # 0.8 s: well past one lease
            await asyncio.sleep(0.1)
            assert hub.sender("named", "k") is not None  # requests keep naming it
        still_open = {name for name, next_item in pending.items() if not next_item.done()}
        idle_ended = _stopped(pending["idle"])
        answer.send(b"data: long\n\n")
        answer.end()
        last = await pending["busy"]
        await asyncio.sleep(0.6)  # nothing names or uses either now
        ended_later = [_stopped(pending["named"]), await asyncio.wait_for(_ended(channels["busy"]), 5)]
        return still_open, idle_ended, last, ended_later, hub.sender("idle", "k")

    still_open, idle_ended, last, ended_later, idle_sender = asyncio.run(scenario())
    assert still_open == {"named", "busy"} and idle_ended and idle_sender is None
    assert last == [("long", b"data: long\n\n"), ("long", None)]
    assert ended_later == [True, True]


def _stopped(next_item: asyncio.Future) -> bool:
    """The channel's stream ended where it was waiting for its next item."""
    return next_item.done() and isinstance(next_item.exception(), StopAsyncIteration)


async def _ended(channel) -> bool:
    try:
        await channel.__anext__()
    except StopAsyncIteration:
        return True
    return False
