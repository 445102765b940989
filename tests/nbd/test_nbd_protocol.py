"""The NBD handshake and the transmission phase, as real clients and a raw client see them."""

from __future__ import annotations

import errno
import json
import os
import struct

from nbdtestkit import CH, RawClient, qemu_io, run, uri

from isrsync.vm import nbd

SIZE = 4 * CH + 4096  # not a multiple of the chunk size


async def _still_serving(served, size: int = SIZE) -> None:
    res = (await run("nbdinfo", "--json", served.uri)).check()
    assert json.loads(res.out)["exports"][0]["export-size"] == size


async def test_nbdinfo_shows_size_flags_and_block_sizes(raw_export) -> None:
    served, _, _ = await raw_export(SIZE)
    info = json.loads((await run("nbdinfo", "--json", served.uri)).check().out)
    assert info["protocol"] == "newstyle-fixed"
    (exp,) = info["exports"]
    assert exp["export-name"] == "disk"
    assert exp["export-size"] == SIZE
    assert exp["is_read_only"] is False
    for cap in ("can_flush", "can_trim", "can_zero", "can_fua", "can_cache"):
        assert exp[cap] is True, cap
    assert exp["block_size_minimum"] == 1
    assert exp["block_size_preferred"] == CH
    assert exp["block_size_maximum"] == nbd.MAX_REQUEST


async def test_list_names_the_export(raw_export) -> None:
    served, _, _ = await raw_export(SIZE)
    res = (await run("nbdinfo", "--list", "--json", served.uri)).check()
    exports = json.loads(res.out)["exports"]
    assert [e["export-name"] for e in exports] == ["disk"]
    assert exports[0]["export-size"] == SIZE
    # the plain text form too (what a user types)
    assert 'export="disk"' in (await run("nbdinfo", "--list", served.uri)).check().out


async def test_unknown_export_is_refused_and_server_keeps_serving(raw_export) -> None:
    served, _, _ = await raw_export(SIZE)
    res = await run("nbdinfo", uri(served.sock, "no-such-export"))
    assert res.rc != 0
    assert "opt_go" in res.err.lower() or "export" in res.err.lower(), res.err
    res = await qemu_io(uri(served.sock, "no-such-export"), "read 0 512")
    assert res.rc != 0
    await _still_serving(served)
    # the empty name is the default export
    res = (await run("nbdinfo", "--json", uri(served.sock, ""))).check()
    assert json.loads(res.out)["exports"][0]["export-size"] == SIZE


async def test_raw_abort_is_acked_then_closed(raw_export) -> None:
    served, _, _ = await raw_export(SIZE)
    c, hflags = await RawClient.connect(served.sock)
    assert hflags == nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES
    c.client_flags(nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES)
    c.option(nbd.OPT_ABORT)
    assert await c.reply() == (nbd.OPT_ABORT, nbd.REP_ACK, b"")
    assert await c.eof()
    await c.close()
    await _still_serving(served)


async def test_raw_list_info_and_unsupported_options(raw_export) -> None:
    served, _, _ = await raw_export(SIZE)
    c, _ = await RawClient.connect(served.sock)
    c.client_flags(nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES)
    # LIST
    c.option(nbd.OPT_LIST)
    opt, rtype, data = await c.reply()
    assert (opt, rtype) == (nbd.OPT_LIST, nbd.REP_SERVER)
    assert data == struct.pack(">I", 4) + b"disk"
    assert await c.reply() == (nbd.OPT_LIST, nbd.REP_ACK, b"")
    # LIST with data is invalid
    c.option(nbd.OPT_LIST, b"junk")
    assert (await c.reply())[1] == nbd.REP_ERR_INVALID
    # unknown option and STARTTLS: refused, session goes on
    c.option(99, b"whatever")
    assert await c.reply() == (99, nbd.REP_ERR_UNSUP, b"")
    c.option(nbd.OPT_STARTTLS)
    assert (await c.reply())[1] == nbd.REP_ERR_POLICY
    # INFO: malformed, unknown name, good
    c.option(nbd.OPT_INFO, b"\x00\x00")
    assert (await c.reply())[1] == nbd.REP_ERR_INVALID
    c.option(nbd.OPT_INFO, struct.pack(">I", 3) + b"bad" + struct.pack(">H", 0))
    assert (await c.reply())[1] == nbd.REP_ERR_UNKNOWN
    c.option(nbd.OPT_INFO, struct.pack(">I", 4) + b"disk" + struct.pack(">HH", 1, nbd.INFO_BLOCK_SIZE))
    infos = {}
    while True:
        opt, rtype, data = await c.reply()
        assert opt == nbd.OPT_INFO
        if rtype == nbd.REP_ACK:
            break
        assert rtype == nbd.REP_INFO
        infos[struct.unpack_from(">H", data)[0]] = data
    size, tflags = struct.unpack_from(">QH", infos[nbd.INFO_EXPORT], 2)
    assert size == SIZE
    assert tflags & nbd.TF_HAS_FLAGS and tflags & nbd.TF_SEND_FLUSH and not tflags & nbd.TF_READ_ONLY
    assert struct.unpack_from(">III", infos[nbd.INFO_BLOCK_SIZE], 2) == (1, CH, nbd.MAX_REQUEST)
    # GO (empty name = default export) enters transmission: a read works
    c.option(nbd.OPT_GO, struct.pack(">I", 0) + struct.pack(">H", 0))
    while (await c.reply())[1] != nbd.REP_ACK:
        pass
    c.request(nbd.CMD_READ, 0, 512)
    err, handle, data = await c.simple_reply(512)
    assert (err, handle, len(data)) == (0, 1, 512)
    c.request(nbd.CMD_DISC)
    assert await c.eof()
    await c.close()


async def test_raw_export_name_with_and_without_zeroes(raw_export) -> None:
    served, _, initial = await raw_export(SIZE)
    for cflags, tail in ((nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES, 0), (nbd.FLAG_C_FIXED_NEWSTYLE, 124)):
        c, _ = await RawClient.connect(served.sock)
        c.client_flags(cflags)
        c.option(nbd.OPT_EXPORT_NAME, b"disk")
        size, tflags = struct.unpack(">QH", await c.read_exactly(10))
        assert size == SIZE and tflags & nbd.TF_SEND_TRIM
        if tail:
            assert await c.read_exactly(tail) == bytes(tail)
        c.request(nbd.CMD_READ, CH - 100, 200)
        err, _, data = await c.simple_reply(200)
        assert err == 0 and data == initial[CH - 100 : CH + 100]
        c.request(nbd.CMD_DISC)
        assert await c.eof()
        await c.close()
    # a wrong name can only be answered by hanging up
    c, _ = await RawClient.connect(served.sock)
    c.client_flags(nbd.FLAG_C_FIXED_NEWSTYLE)
    c.option(nbd.OPT_EXPORT_NAME, b"nope")
    assert await c.eof()
    await c.close()
    await _still_serving(served)


async def test_garbage_is_disconnected_without_harm(raw_export) -> None:
    served, path, initial = await raw_export(SIZE)
    cases = [
        # bad client flags (no FIXED_NEWSTYLE), unknown client flag bits
        (0, b""),
        (nbd.FLAG_C_FIXED_NEWSTYLE | 0x80, b""),
        # bad option magic
        (nbd.FLAG_C_FIXED_NEWSTYLE, struct.pack(">QII", 0xDEADBEEF, nbd.OPT_LIST, 0)),
        # an absurdly long option
        (nbd.FLAG_C_FIXED_NEWSTYLE, struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_LIST, 1 << 30)),
        # random noise
        (nbd.FLAG_C_FIXED_NEWSTYLE, os.urandom(300)),
    ]
    for cflags, junk in cases:
        c, _ = await RawClient.connect(served.sock)
        c.client_flags(cflags)
        c.send(junk)
        assert await c.eof(), (cflags, junk[:16])
        await c.close()
    # garbage in the transmission phase: bad request magic
    c, _ = await RawClient.connect(served.sock)
    c.client_flags(nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES)
    c.option(nbd.OPT_EXPORT_NAME, b"disk")
    await c.read_exactly(10)
    c.send(struct.pack(">IHHQQI", 0x12345678, 0, nbd.CMD_WRITE, 1, 0, 4) + b"XXXX")
    assert await c.eof()
    await c.close()
    # a client that hangs up mid-handshake
    c, _ = await RawClient.connect(served.sock)
    c.send(b"\x00\x00")
    await c.close()
    await _still_serving(served)
    assert path.read_bytes() == initial  # nothing was written by any of them


async def test_transmission_errors_keep_the_connection(raw_export) -> None:
    served, path, initial = await raw_export(SIZE)
    c, _ = await RawClient.connect(served.sock)
    c.client_flags(nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES)
    c.option(nbd.OPT_EXPORT_NAME, b"disk")
    await c.read_exactly(10)
    c.request(nbd.CMD_READ, SIZE - 10, 11)  # past the end
    assert (await c.simple_reply(11))[0] == errno.EINVAL
    c.request(nbd.CMD_WRITE, SIZE - 2, 4, b"ABCD")  # past the end: payload still consumed
    assert (await c.simple_reply())[0] == errno.ENOSPC
    c.request(77, 0, 0)  # unknown command
    assert (await c.simple_reply())[0] == errno.EINVAL
    c.request(nbd.CMD_WRITE_ZEROES, SIZE - 1, 2)
    assert (await c.simple_reply())[0] == errno.EINVAL
    # the connection still works, and FUA writes land
    c.request(nbd.CMD_WRITE, 5, 4, b"WXYZ", flags=nbd.CMD_FLAG_FUA)
    assert (await c.simple_reply())[0] == 0
    c.request(nbd.CMD_READ, 0, 12)
    err, _, data = await c.simple_reply(12)
    assert err == 0 and data == initial[:5] + b"WXYZ" + initial[9:12]
    c.request(nbd.CMD_CACHE, 0, SIZE)
    assert (await c.simple_reply())[0] == 0
    c.request(nbd.CMD_TRIM, 5, 2)
    assert (await c.simple_reply())[0] == 0
    c.request(nbd.CMD_FLUSH)
    assert (await c.simple_reply())[0] == 0
    c.request(nbd.CMD_DISC)
    assert await c.eof()
    await c.close()
    assert path.read_bytes() == initial[:5] + b"\0\0YZ" + initial[9:]


async def test_pipelined_requests_all_answered(raw_export) -> None:
    """Many requests sent before reading any reply: each handle answered once, with its data."""
    served, _, initial = await raw_export(SIZE)
    c, _ = await RawClient.connect(served.sock)
    c.client_flags(nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES)
    c.option(nbd.OPT_EXPORT_NAME, b"disk")
    await c.read_exactly(10)
    want = {}
    for k in range(200):
        off = (k * 7919) % (SIZE - 1000)
        want[c.request(nbd.CMD_READ, off, 1000)] = initial[off : off + 1000]
    await c.w.drain()
    for _ in range(200):
        err, handle, data = await c.simple_reply(1000)
        assert err == 0 and data == want.pop(handle)
    assert not want
    await c.close()


async def test_read_only_export_refuses_writes(raw_export) -> None:
    served, path, initial = await raw_export(SIZE, read_only=True)
    exp = json.loads((await run("nbdinfo", "--json", served.uri)).check().out)["exports"][0]
    assert exp["is_read_only"] is True and exp["can_trim"] is False and exp["can_zero"] is False
    # qemu will not even open it for writing; read-only it reads fine and cannot write
    res = await qemu_io(served.uri, "write -P 0x41 0 512")
    assert res.rc != 0
    res = await qemu_io(served.uri, "write -P 0x41 0 512", read_only=True)
    assert res.rc != 0
    res = await qemu_io(served.uri, f"read -P {initial[CH]:#x} {CH} 1", read_only=True)
    assert res.rc == 0, res.err
    # on the wire: a client that ignores the flag gets EPERM, and the stream stays in sync
    c, _ = await RawClient.connect(served.sock)
    c.client_flags(nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES)
    c.option(nbd.OPT_EXPORT_NAME, b"disk")
    _, tflags = struct.unpack(">QH", await c.read_exactly(10))
    assert tflags & nbd.TF_READ_ONLY
    c.request(nbd.CMD_WRITE, 0, 512, b"A" * 512)
    assert (await c.simple_reply())[0] == errno.EPERM
    c.request(nbd.CMD_TRIM, 0, 512)
    assert (await c.simple_reply())[0] == errno.EPERM
    c.request(nbd.CMD_WRITE_ZEROES, 0, 512)
    assert (await c.simple_reply())[0] == errno.EPERM
    c.request(nbd.CMD_READ, 0, 512)
    err, _, data = await c.simple_reply(512)
    assert err == 0 and data == initial[:512]
    await c.close()
    assert path.read_bytes() == initial
