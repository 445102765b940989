"""The control protocol of a running parcel: typed requests, checked before a handler
sees them, over a real unix socket."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from isrsync.errors import NotFound, UsageError
from isrsync.site.control import (
    AddSource,
    ControlServer,
    ListSources,
    StatusRequest,
    SuspendRequest,
    SyncRequest,
    WithdrawSource,
    call,
    decode_request,
    encode_request,
)


@pytest.mark.parametrize("req", [StatusRequest(), SyncRequest(), SuspendRequest(), SuspendRequest(True),
                                 ListSources(), AddSource("/srv/cache"), WithdrawSource("dir:/srv/cache")])
def test_every_request_round_trips(req) -> None:
    assert decode_request(encode_request(req)) == req


@pytest.mark.parametrize("line,why", [
    (b"not json", "malformed"),
    (b"[1, 2]", "malformed"),
    (b'{"cmd": "reboot-the-host"}', "unknown control command"),
    (b'{"cmd": "add-source"}', "needs 'path'"),
    (b'{"cmd": "add-source", "path": 7}', "must be a str"),
    (b'{"cmd": "suspend", "keep_lock": "yes"}', "must be a bool"),
    (b'\xff\xfe', "malformed"),
])
def test_malformed_requests_are_usage_errors(line: bytes, why: str) -> None:
    with pytest.raises(UsageError, match=why):
        decode_request(line)


async def test_a_server_answers_typed_requests_and_maps_errors(tmp_path: Path) -> None:
    seen = []

    async def handler(req, progress):
        seen.append(req)
        if isinstance(req, WithdrawSource):
            raise NotFound(f"no source named {req.name!r}")
        return {"ok": type(req).__name__}

    srv = ControlServer(tmp_path / "c.sock", handler)
    await srv.start()
    try:
        assert await call(srv.path, StatusRequest()) == {"ok": "StatusRequest"}
        with pytest.raises(NotFound, match="no source named 'x'"):
            await call(srv.path, WithdrawSource("x"))
        # A hostile or broken client gets a clear error line, and the handler never sees it.
        import asyncio

        r, w = await asyncio.open_unix_connection(str(srv.path))
        w.write(b'{"cmd": "add-source", "path": null}\n')
        await w.drain()
        reply = json.loads(await r.readline())
        w.close()
        assert reply["ok"] is False and reply["exit_code"] == 2 and "must be a str" in reply["error"]
        assert seen == [StatusRequest(), WithdrawSource("x")]
    finally:
        await srv.close()


async def test_progress_lines_reach_the_asker_before_the_reply(tmp_path: Path) -> None:
    async def handler(req, progress):
        for done in (0, 5, 10):
            progress("upload", done, 10)
        progress("medium", 3, None)
        return {"done": True}

    srv = ControlServer(tmp_path / "c.sock", handler)
    await srv.start()
    try:
        steps = []
        req = SuspendRequest(keep_lock=False, to_medium="/media/key", full=True)
        assert decode_request(encode_request(req)) == req
        result = await call(srv.path, req, on_progress=lambda *a: steps.append(a))
        assert result == {"done": True}
        assert steps == [("upload", 0, 10), ("upload", 5, 10), ("upload", 10, 10), ("medium", 3, None)]
    finally:
        await srv.close()
