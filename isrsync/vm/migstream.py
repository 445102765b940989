"""QEMU's migration stream (file format 3, as QEMU 7.2 writes it): enough of it to
turn a saved precopy stream into a post-copy one. Bytes in, bytes out; no I/O.

A stream saved with ``x-ignore-shared`` (guest RAM kept apart in our memfd) is:

    magic, version, CONFIGURATION (machine type, subsections)
    SECTION_START "ram": the RAM block list (name, length, address), EOS, footer
    SECTION_PART/END "ram": pages of the blocks not shared (ROMs, ACPI tables), EOS
    SECTION_FULL x N: device state, opaque to us (only QEMU can parse it)
    EOF, VMDESCRIPTION (JSON)

To resume lazily, isrsync plays the migration source of a post-copy migration
(QEMU's ``postcopy-ram``): it sends the configuration and the RAM block list,
the non-shared pages, then the device state in a PACKAGED command between
POSTCOPY_LISTEN and POSTCOPY_RUN. The guest starts at once; its RAM pages
arrive afterwards, in the order the guest faults on them (QEMU asks on the
return path) or in the background. :func:`parse` takes the saved stream apart;
the builders below write the pieces of the new one.

Everything here is checked before it is trusted: a stream this module cannot
take apart raises :class:`StreamError`, and the caller restores it the
ordinary way (QEMU parses it then).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

MAGIC = 0x5145564D  # "QEVM"
VERSION = 3

# Section types.
S_EOF = 0x00
S_START = 0x01
S_PART = 0x02
S_END = 0x03
S_FULL = 0x04
S_SUBSECTION = 0x05
S_VMDESC = 0x06
S_CONFIG = 0x07
S_COMMAND = 0x08
S_FOOTER = 0x7E

# Commands (QEMU_VM_COMMAND), source to destination.
CMD_OPEN_RETURN_PATH = 1
CMD_PING = 2
CMD_POSTCOPY_ADVISE = 3
CMD_POSTCOPY_LISTEN = 4
CMD_POSTCOPY_RUN = 5
CMD_POSTCOPY_RAM_DISCARD = 6
CMD_PACKAGED = 7

# Return-path messages, destination to source.
RP_SHUT = 1
RP_PONG = 2
RP_REQ_PAGES_ID = 3
RP_REQ_PAGES = 4
RP_HEADER = struct.Struct(">HH")

# Flags in the low bits of a RAM record's address.
F_ZERO = 0x02
F_MEM_SIZE = 0x04
F_PAGE = 0x08
F_EOS = 0x10
F_CONTINUE = 0x20

PAGE = 4096  # x86 target page; the only one this module handles
_ZERO_PAGE = bytes(PAGE)
_U64 = struct.Struct(">Q")
_FLAG_MASK = PAGE - 1
RAM_SECTION_VERSION = 4
_CONFIG_SUBSECTIONS = ("configuration/target-page-bits", "configuration/capabilities", "configuration/uuid")
_MAX_PACKAGE = 1 << 24  # QEMU's MAX_VM_CMD_PACKAGED_SIZE


class StreamError(ValueError):
    """The stream is malformed, or uses a feature this module does not take apart."""


@dataclass(frozen=True)
class RamBlock:
    name: str
    length: int
    addr: int | None = None  # guest physical address (streams saved with x-ignore-shared)


@dataclass
class SavedState:
    """A saved precopy stream taken apart."""

    machine: str
    target_page_bits: int | None
    uuid: bytes | None
    capabilities: list[str]
    ram_section_id: int
    ram_instance_id: int
    blocks: list[RamBlock]
    # Non-zero pages carried by the stream, per block: offset -> 4 KiB.
    pages: dict[str, dict[int, bytes]] = field(default_factory=dict)
    devices: bytes = b""  # the device sections, verbatim, for the PACKAGED command

    def block(self, name: str) -> RamBlock:
        for b in self.blocks:
            if b.name == name:
                return b
        raise StreamError(f"the stream has no RAM block {name!r}")


class _Reader:
    def __init__(self, buf: bytes) -> None:
        self.buf = memoryview(buf)
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise StreamError(f"the stream is truncated at byte {self.pos}")
        v = self.buf[self.pos : self.pos + n]
        self.pos += n
        return v

    def u8(self) -> int:
        return self.take(1)[0]

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def u64(self) -> int:
        return int.from_bytes(self.take(8), "big")

    def counted(self) -> str:
        return bytes(self.take(self.u8())).decode("latin-1")


def _device_end(buf: bytes, start: int) -> int:
    """Where the device sections end: at the EOF byte before the VMDESCRIPTION.

    Device sections cannot be walked without QEMU's field layouts, so the end
    is found from the other side: EOF, 0x06, be32 length, then exactly that
    many bytes of JSON to the end of the stream. JSON holds no NUL byte, so
    the last candidate that fits is the one.
    """
    p = buf.rfind(b"\x00\x06", start)
    while p >= start:
        if p + 6 < len(buf) and int.from_bytes(buf[p + 2 : p + 6], "big") == len(buf) - p - 6 and buf[p + 6] == 0x7B:
            return p
        p = buf.rfind(b"\x00\x06", start, p + 1)
    if buf and buf[-1] == S_EOF:  # saved without a description (suppress-vmdesc)
        return len(buf) - 1
    raise StreamError("the end of the device state was not found")


def _read_config(r: _Reader) -> tuple[str, int | None, bytes | None, list[str]]:
    if r.u8() != S_CONFIG:
        raise StreamError("the stream has no configuration section")
    machine = bytes(r.take(r.u32())).decode("latin-1")
    bits: int | None = None
    uuid: bytes | None = None
    caps: list[str] = []
    while r.pos < len(r.buf) and r.buf[r.pos] == S_SUBSECTION:
        r.u8()
        name = r.counted()
        r.u32()  # its version
        if name == _CONFIG_SUBSECTIONS[0]:
            bits = r.u32()
        elif name == _CONFIG_SUBSECTIONS[1]:
            caps = [r.counted() for _ in range(r.u32())]
        elif name == _CONFIG_SUBSECTIONS[2]:
            uuid = bytes(r.take(16))
        else:
            raise StreamError(f"unknown configuration subsection {name!r}")
    return machine, bits, uuid, caps


def _read_ram(r: _Reader, st: SavedState, ignore_shared: bool) -> None:
    """RAM records up to and including EOS (QEMU's ram_load_precopy, the parts we meet).

    A resume parses a few thousand pages here, on the loop that starts the guest:
    the page records are read inline (a method call per field made the parse and
    what goes with it take 7-14 ms a resume, against 2-3 ms now, measured with
    benchmarks/usb_resume.py).
    """
    block: str | None = None
    length = 0
    pages: dict[int, bytes] = {}
    buf, end = r.buf, len(r.buf)
    u64 = _U64.unpack_from
    while True:
        pos = r.pos
        if pos + 8 > end:
            raise StreamError(f"the stream is truncated at byte {pos}")
        (word,) = u64(buf, pos)
        r.pos = pos + 8
        flags, addr = word & _FLAG_MASK, word & ~_FLAG_MASK
        if flags & (F_ZERO | F_PAGE):
            if not flags & F_CONTINUE:
                block = r.counted()
                length = st.block(block).length
                pages = st.pages.setdefault(block, {})
            elif block is None:
                raise StreamError("a RAM page continues a block that was never named")
            if addr >= length:
                raise StreamError(f"a page lies beyond the end of RAM block {block!r}")
        kind = flags & ~F_CONTINUE
        if kind == F_PAGE:
            pos = r.pos
            if pos + PAGE > end:
                raise StreamError(f"the stream is truncated at byte {pos}")
            r.pos = pos + PAGE
            data = bytes(buf[pos : pos + PAGE])
            if data == _ZERO_PAGE:
                pages.pop(addr, None)  # a later zero page overrides an earlier one
            else:
                pages[addr] = data
        elif kind == F_ZERO:
            pos = r.pos
            if pos >= end:
                raise StreamError(f"the stream is truncated at byte {pos}")
            r.pos = pos + 1
            fill = buf[pos]
            if fill:
                pages[addr] = bytes((fill,)) * PAGE
            else:
                pages.pop(addr, None)
        elif kind == F_EOS:
            return
        elif kind == F_MEM_SIZE:
            left = addr
            while left > 0:
                name = r.counted()
                size = r.u64()
                at = r.u64() if ignore_shared else None
                if size % PAGE:
                    raise StreamError(f"RAM block {name!r} is not a whole number of pages")
                st.blocks.append(RamBlock(name, size, at))
                left -= size
            if left:
                raise StreamError("the RAM block list does not add up to its total")
        else:
            raise StreamError(f"RAM record flags {flags:#x} (compression, XBZRLE or RDMA) are not handled")


def _footer(r: _Reader, sid: int) -> None:
    if r.u8() != S_FOOTER or r.u32() != sid:
        raise StreamError(f"section {sid} has no matching footer")


def parse(buf: bytes) -> SavedState:
    """Take apart a precopy stream saved by QEMU 7.2 (RAM kept apart or not)."""
    r = _Reader(buf)
    if r.u32() != MAGIC:
        raise StreamError("not a QEMU migration stream")
    if r.u32() != VERSION:
        raise StreamError("a migration stream version other than 3")
    machine, bits, uuid, caps = _read_config(r)
    st: SavedState | None = None
    while True:
        kind = r.u8()
        if kind == S_START:
            sid = r.u32()
            name = r.counted()
            instance, version = r.u32(), r.u32()
            if name != "ram" or st is not None:
                raise StreamError(f"an iterative section {name!r} besides RAM")
            if version != RAM_SECTION_VERSION:
                raise StreamError(f"RAM section version {version}")
            st = SavedState(machine, bits, uuid, caps, sid, instance, [])
            _read_ram(r, st, "x-ignore-shared" in caps)
            _footer(r, sid)
        elif kind in (S_PART, S_END):
            sid = r.u32()
            if st is None or sid != st.ram_section_id:
                raise StreamError(f"section {sid} continues no RAM section")
            _read_ram(r, st, False)
            _footer(r, sid)
        elif kind == S_FULL:
            if st is None:
                raise StreamError("device state before the RAM section")
            start = r.pos - 1
            st.devices = bytes(buf[start : _device_end(buf, start)])
            if len(st.devices) > _MAX_PACKAGE:
                raise StreamError("the device state is too large for one package")
            return st
        else:
            raise StreamError(f"section type {kind:#x} where a section was expected")


# --------------------------------------------------------------------------- building


def _u32(v: int) -> bytes:
    return v.to_bytes(4, "big")


def _u64(v: int) -> bytes:
    return v.to_bytes(8, "big")


def _counted(s: str) -> bytes:
    b = s.encode("latin-1")
    if len(b) > 255:
        raise StreamError(f"name too long: {s!r}")
    return bytes([len(b)]) + b


def header(st: SavedState) -> bytes:
    """Magic, version and configuration for a destination without x-ignore-shared."""
    out = bytearray(_u32(MAGIC) + _u32(VERSION) + bytes([S_CONFIG]))
    name = st.machine.encode("latin-1")
    out += _u32(len(name)) + name
    if st.target_page_bits is not None:
        out += bytes([S_SUBSECTION]) + _counted(_CONFIG_SUBSECTIONS[0]) + _u32(1) + _u32(st.target_page_bits)
    # The capabilities subsection is left out: x-ignore-shared (the only one
    # QEMU validates) is off on a post-copy destination.
    if st.uuid is not None:
        out += bytes([S_SUBSECTION]) + _counted(_CONFIG_SUBSECTIONS[2]) + _u32(1) + st.uuid
    return bytes(out)


def command(cmd: int, payload: bytes = b"") -> bytes:
    return bytes([S_COMMAND]) + cmd.to_bytes(2, "big") + len(payload).to_bytes(2, "big") + payload


def postcopy_advise() -> bytes:
    # The OR of all blocks' page sizes, then the target page size: 4 KiB each here.
    return command(CMD_POSTCOPY_ADVISE, _u64(PAGE) + _u64(PAGE))


def postcopy_discard(block: str, offset: int, length: int) -> bytes:
    """Drop a range the destination already has.

    Also a needed step: QEMU 7.2 moves from ADVISE to LISTENING correctly
    only through a DISCARD. A LISTEN straight after ADVISE runs the first
    discard's set-up, which sets the state back to DISCARD, and then QEMU
    loads post-copy pages with its precopy loader, which faults on the very
    page it is placing (a deadlock) and refuses the RUN.
    """
    if offset % PAGE or length % PAGE or length <= 0:
        raise StreamError("a discard must cover whole pages")
    return command(CMD_POSTCOPY_RAM_DISCARD, b"\x00" + _counted(block) + b"\x00" + _u64(offset) + _u64(length))


def ping(value: int) -> bytes:
    return command(CMD_PING, _u32(value))


def ram_setup(st: SavedState) -> bytes:
    """SECTION_START "ram": the block list, without addresses (no x-ignore-shared)."""
    out = bytearray([S_START]) + _u32(st.ram_section_id) + _counted("ram")
    out += _u32(st.ram_instance_id) + _u32(RAM_SECTION_VERSION)
    out += _u64(sum(b.length for b in st.blocks) | F_MEM_SIZE)
    for b in st.blocks:
        out += _counted(b.name) + _u64(b.length)
    out += _u64(F_EOS) + bytes([S_FOOTER]) + _u32(st.ram_section_id)
    return bytes(out)


def package(st: SavedState) -> bytes:
    """LISTEN, the device state, RUN: wrapped in one PACKAGED command.

    QEMU reads the whole package before loading it, so that its main stream is
    free for pages while the devices load (loading a virtio device reads guest
    RAM, which faults, which asks us for pages).
    """
    inner = command(CMD_POSTCOPY_LISTEN) + st.devices + command(CMD_POSTCOPY_RUN)
    return command(CMD_PACKAGED, _u32(len(inner))) + inner


def page_section(section_id: int, block: str, pages: list[tuple[int, bytes | memoryview | None]], *,
                 end: bool = False) -> list[bytes | memoryview]:
    """A SECTION_PART (or END) of pages of one block, as buffers to write in order.

    ``None`` data is a zero page. The first record names the block; the others
    continue it (QEMU remembers the block across sections too, but naming it
    once per section keeps each section self-contained).
    """
    out: list[bytes | memoryview] = [bytes([S_END if end else S_PART]) + _u32(section_id)]
    name = _counted(block)
    first = True
    for offset, data in pages:
        if offset % PAGE:
            raise StreamError(f"page offset {offset:#x} is not page-aligned")
        flags = F_PAGE if data is not None else F_ZERO
        if first:
            out.append(_u64(offset | flags) + name)
            first = False
        else:
            out.append(_u64(offset | flags | F_CONTINUE))
        if data is None:
            out.append(b"\x00")
        else:
            if len(data) != PAGE:
                raise StreamError("a page must be 4 KiB")
            out.append(data)
    out.append(_u64(F_EOS) + bytes([S_FOOTER]) + _u32(section_id))
    return out


def end_of_stream(section_id: int) -> bytes:
    """SECTION_END of RAM with no pages, then EOF: QEMU finishes the post-copy."""
    return bytes([S_END]) + _u32(section_id) + _u64(F_EOS) + bytes([S_FOOTER]) + _u32(section_id) + bytes([S_EOF])


@dataclass(frozen=True)
class PageRequest:
    block: str | None  # None: the same block as the previous request
    offset: int
    length: int


def parse_rp(kind: int, payload: bytes) -> PageRequest | int:
    """A return-path message: a page request, or the value of a PONG or SHUT."""
    if kind in (RP_PONG, RP_SHUT):
        if len(payload) != 4:
            raise StreamError(f"return-path message {kind} of {len(payload)} bytes")
        return int.from_bytes(payload, "big")
    if kind in (RP_REQ_PAGES, RP_REQ_PAGES_ID):
        if len(payload) < 12:
            raise StreamError("a short page request")
        offset, length = int.from_bytes(payload[:8], "big"), int.from_bytes(payload[8:12], "big")
        block = None
        if kind == RP_REQ_PAGES_ID:
            n = payload[12] if len(payload) > 12 else -1
            if n < 0 or len(payload) != 13 + n:
                raise StreamError("a page request with a malformed block name")
            block = payload[13:].decode("latin-1")
        elif len(payload) != 12:
            raise StreamError("a page request of the wrong length")
        return PageRequest(block, offset, length)
    raise StreamError(f"unexpected return-path message type {kind}")
