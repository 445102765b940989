"""QEMU's migration stream, taken apart and rebuilt for a post-copy restore
(isrsync.vm.migstream): synthetic streams laid out as QEMU 7.2's savevm.c and
ram.c write them, every truncation and damage of one, and the exact bytes of
what we send. A real QEMU's stream is taken apart in tests/vm/test_postcopy.py."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isrsync.vm import migstream as ms

PAGE = ms.PAGE


def u32(v: int) -> bytes:
    return struct.pack(">I", v)


def u64(v: int) -> bytes:
    return struct.pack(">Q", v)


def counted(s: str) -> bytes:
    return bytes([len(s)]) + s.encode()


def sub(name: str, body: bytes) -> bytes:
    return bytes([ms.S_SUBSECTION]) + counted(name) + u32(1) + body


def page(n: int) -> bytes:
    return bytes([n]) * PAGE


DEVICES = (
    bytes([ms.S_FULL]) + u32(3) + counted("timer") + u32(0) + u32(2) + b"\x00\x06\x00\x00\x01\x02" * 5
    + bytes([ms.S_FOOTER]) + u32(3)
    + bytes([ms.S_FULL]) + u32(4) + counted("cpu") + u32(0) + u32(12) + bytes(range(200)) * 3
    + bytes([ms.S_FOOTER]) + u32(4)
)


def saved_stream(*, ignore_shared: bool = True, uuid: bool = False, vmdesc: bool = True,
                 devices: bytes = DEVICES) -> bytes:
    """A precopy stream as QEMU 7.2 saves it: config, RAM setup, RAM pages, devices, EOF, JSON."""
    out = bytearray(u32(ms.MAGIC) + u32(3) + bytes([ms.S_CONFIG]) + u32(3) + b"q35")
    if ignore_shared:
        out += sub("configuration/capabilities", u32(1) + counted("x-ignore-shared"))
    if uuid:
        out += sub("configuration/uuid", bytes(range(16)))
    blocks = [("pc.ram", 64 * PAGE, 0), ("pc.bios", 4 * PAGE, 0xFFFC0000), ("/rom@etc/acpi/rsdp", PAGE, 0)]
    out += bytes([ms.S_START]) + u32(2) + counted("ram") + u32(0) + u32(4)
    out += u64(sum(b[1] for b in blocks) | ms.F_MEM_SIZE)
    for name, length, addr in blocks:
        out += counted(name) + u64(length) + (u64(addr) if ignore_shared else b"")
    out += u64(ms.F_EOS) + bytes([ms.S_FOOTER]) + u32(2)
    # PART: bios page 0 (data), page 1 zero, page 2 data (CONTINUE), page 3 filled with 7s.
    out += bytes([ms.S_PART]) + u32(2)
    out += u64(0 | ms.F_PAGE) + counted("pc.bios") + page(1)
    out += u64(PAGE | ms.F_ZERO | ms.F_CONTINUE) + b"\x00"
    out += u64(2 * PAGE | ms.F_PAGE | ms.F_CONTINUE) + page(2)
    out += u64(3 * PAGE | ms.F_ZERO | ms.F_CONTINUE) + b"\x07"
    out += u64(ms.F_EOS) + bytes([ms.S_FOOTER]) + u32(2)
    # END: rsdp page, then bios page 2 made zero again.
    out += bytes([ms.S_END]) + u32(2)
    out += u64(0 | ms.F_PAGE) + counted("/rom@etc/acpi/rsdp") + page(9)
    out += u64(2 * PAGE | ms.F_ZERO) + counted("pc.bios") + b"\x00"
    out += u64(ms.F_EOS) + bytes([ms.S_FOOTER]) + u32(2)
    out += devices + bytes([ms.S_EOF])
    if vmdesc:
        desc = json.dumps({"page_size": PAGE, "devices": [{"name": "timer"}, {"name": "cpu"}]}).encode()
        out += bytes([ms.S_VMDESC]) + u32(len(desc)) + desc
    return bytes(out)


def test_a_saved_stream_is_taken_apart() -> None:
    st_ = ms.parse(saved_stream(uuid=True))
    assert st_.machine == "q35" and st_.capabilities == ["x-ignore-shared"] and st_.uuid == bytes(range(16))
    assert st_.ram_section_id == 2 and st_.ram_instance_id == 0
    assert [(b.name, b.length, b.addr) for b in st_.blocks] == [
        ("pc.ram", 64 * PAGE, 0), ("pc.bios", 4 * PAGE, 0xFFFC0000), ("/rom@etc/acpi/rsdp", PAGE, 0)]
    # Zero pages are not kept; a later zero page overrides an earlier one; a non-zero fill is a page.
    assert st_.pages["pc.bios"] == {0: page(1), 3 * PAGE: page(7)}
    assert st_.pages["/rom@etc/acpi/rsdp"] == {0: page(9)}
    assert st_.devices == DEVICES


def test_without_description_or_ignore_shared() -> None:
    st_ = ms.parse(saved_stream(ignore_shared=False, vmdesc=False))
    assert st_.capabilities == [] and all(b.addr is None for b in st_.blocks)
    assert st_.devices == DEVICES


def test_device_state_holding_the_end_marker_bytes_is_kept_whole() -> None:
    # 00 06 followed by a plausible length inside a device section must not end it early.
    tricky = DEVICES[:40] + b"\x00\x06" + u32(10) + b"{" + bytes(9) + DEVICES[40:]
    assert ms.parse(saved_stream(devices=tricky)).devices == tricky


def test_the_postcopy_header_drops_the_ignore_shared_capability() -> None:
    st_ = ms.parse(saved_stream(uuid=True))
    h = ms.header(st_)
    assert h == (u32(ms.MAGIC) + u32(3) + bytes([ms.S_CONFIG]) + u32(3) + b"q35"
                 + sub("configuration/uuid", bytes(range(16))))


def test_ram_setup_lists_blocks_without_addresses() -> None:
    st_ = ms.parse(saved_stream())
    total = 64 * PAGE + 4 * PAGE + PAGE
    assert ms.ram_setup(st_) == (
        bytes([ms.S_START]) + u32(2) + counted("ram") + u32(0) + u32(4) + u64(total | ms.F_MEM_SIZE)
        + counted("pc.ram") + u64(64 * PAGE) + counted("pc.bios") + u64(4 * PAGE)
        + counted("/rom@etc/acpi/rsdp") + u64(PAGE) + u64(ms.F_EOS) + bytes([ms.S_FOOTER]) + u32(2))


def test_commands_and_package() -> None:
    assert ms.command(ms.CMD_OPEN_RETURN_PATH) == b"\x08\x00\x01\x00\x00"
    assert ms.postcopy_advise() == b"\x08\x00\x03\x00\x10" + u64(PAGE) + u64(PAGE)
    assert ms.ping(7) == b"\x08\x00\x02\x00\x04" + u32(7)
    assert ms.postcopy_discard("pc.ram", PAGE, 2 * PAGE) == (
        b"\x08\x00\x06\x00" + bytes([3 + 6 + 16]) + b"\x00" + counted("pc.ram") + b"\x00" + u64(PAGE) + u64(2 * PAGE))
    with pytest.raises(ms.StreamError):
        ms.postcopy_discard("pc.ram", 1, PAGE)
    st_ = ms.parse(saved_stream())
    pkg = ms.package(st_)
    inner = ms.command(ms.CMD_POSTCOPY_LISTEN) + DEVICES + ms.command(ms.CMD_POSTCOPY_RUN)
    assert pkg == b"\x08\x00\x07\x00\x04" + u32(len(inner)) + inner


def test_a_page_section_reads_back_as_ram_records() -> None:
    secs = b"".join(ms.page_section(2, "pc.ram", [(5 * PAGE, page(3)), (0, None), (PAGE, memoryview(page(4)))]))
    assert secs[:5] == bytes([ms.S_PART]) + u32(2)
    # Wrap it as the PART of a stream and take that apart: the same pages come out.
    head = saved_stream()
    cut = head.index(bytes([ms.S_END]) + u32(2))
    st_ = ms.parse(head[:cut] + secs + head[cut:])
    assert st_.pages["pc.ram"] == {5 * PAGE: page(3), PAGE: page(4)}
    end = b"".join(ms.page_section(2, "pc.ram", [(0, page(1))], end=True))
    assert end[0] == ms.S_END
    with pytest.raises(ms.StreamError):
        ms.page_section(2, "pc.ram", [(100, page(1))])
    with pytest.raises(ms.StreamError):
        ms.page_section(2, "pc.ram", [(0, b"short")])
    assert ms.end_of_stream(2) == bytes([ms.S_END]) + u32(2) + u64(ms.F_EOS) + bytes([ms.S_FOOTER]) + u32(2) + b"\x00"


def test_return_path_messages() -> None:
    req = ms.parse_rp(ms.RP_REQ_PAGES_ID, u64(0xC0000) + u32(PAGE) + counted("pc.ram"))
    assert req == ms.PageRequest("pc.ram", 0xC0000, PAGE)
    assert ms.parse_rp(ms.RP_REQ_PAGES, u64(PAGE) + u32(PAGE)) == ms.PageRequest(None, PAGE, PAGE)
    assert ms.parse_rp(ms.RP_PONG, u32(3)) == 3 and ms.parse_rp(ms.RP_SHUT, u32(0)) == 0
    for kind, payload in [(ms.RP_REQ_PAGES, u64(0)), (ms.RP_REQ_PAGES, u64(0) + u32(1) + b"x"),
                          (ms.RP_REQ_PAGES_ID, u64(0) + u32(PAGE) + b"\x09pc.ram"), (ms.RP_PONG, b"\x00"),
                          (9, b"")]:
        with pytest.raises(ms.StreamError):
            ms.parse_rp(kind, payload)


@pytest.mark.parametrize("bad, why", [
    (lambda s: b"XXXX" + s[4:], "not a QEMU migration stream"),
    (lambda s: s[:4] + u32(2) + s[8:], "version"),
    (lambda s: s.replace(counted("configuration/capabilities"), counted("configuration/whatever!!")),
     "configuration subsection"),
    (lambda s: s.replace(counted("ram") + u32(0) + u32(4), counted("blk") + u32(0) + u32(4)), "besides RAM"),
    (lambda s: s.replace(counted("ram") + u32(0) + u32(4), counted("ram") + u32(0) + u32(3)), "version 3"),
    (lambda s: s.replace(u64(2 * PAGE | ms.F_PAGE | ms.F_CONTINUE), u64(2 * PAGE | 0x40 | ms.F_CONTINUE)),
     "flags"),
    (lambda s: s.replace(counted("pc.bios") + page(1), counted("pc.bxos") + page(1)), "no RAM block"),
    (lambda s: s.replace(u64(0 | ms.F_PAGE) + counted("pc.bios"), u64(9 * PAGE | ms.F_PAGE) + counted("pc.bios")),
     "beyond the end"),
    (lambda s: s[: s.rindex(bytes([ms.S_EOF, ms.S_VMDESC]))] + b"\x01", "end of the device state"),
])
def test_malformed_streams_are_refused(bad, why: str) -> None:
    with pytest.raises(ms.StreamError, match=why):
        ms.parse(bad(saved_stream()))


def test_every_truncation_is_refused_cleanly() -> None:
    whole = saved_stream()
    devices_at = whole.index(DEVICES)
    for n in range(0, devices_at + 1):
        with pytest.raises(ms.StreamError):
            ms.parse(whole[:n])


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_damage_is_refused_or_parsed_never_a_crash(data: st.DataObject) -> None:
    buf = bytearray(saved_stream())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    try:
        out = ms.parse(bytes(buf))
    except ms.StreamError:
        return
    # What parses is self-consistent: pages inside their blocks, device state non-empty.
    for name, pages in out.pages.items():
        length = out.block(name).length
        assert all(off % PAGE == 0 and off < length and len(p) == PAGE for off, p in pages.items())
    assert out.devices[:1] == bytes([ms.S_FULL])
