"""The direct path's wire format (issue 12, part 5): chunks by tag from a LAN peer's cache.

A format module: bytes in, typed values out, no I/O (isrsync/swarm/direct.py
does the sockets). One TCP connection (TLS within an organisation) carries
requests one after another; each request gets exactly one response.

Request::

    "ISRq" | version u8 | count u16 | count x (tag 32 | pack id 32 | offset u64 | length u32)

The pack location is the asking site's hint from the home server's pack index:
a peer that holds the chunk only inside a pack it fetched through the swarm reads
it there. The peer answers from its cache by tag first, and only ever answers
bytes whose tag it checked; the asker checks every tag again (a peer may lie).

Response::

    "ISRr" | version u8 | status u8 | count u16 | count x (length u32 | bytes)

``count`` equals the request's; ``length`` :data:`ABSENT` means "not held". A
response with a status other than :attr:`Status.OK` has count 0 and the peer
closes the connection after it.

Every number a reader meets is bounded before it allocates: at most
:data:`MAX_WANTS` chunks per request and :data:`MAX_CHUNK` bytes per chunk, so
neither side can be made to buffer more than :data:`MAX_RESPONSE` bytes.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from ..chunk import CHUNK_SIZE, TAG_SIZE
from ..errors import FormatError, UnsupportedVersion

VERSION = 1
REQUEST_MAGIC = b"ISRq"
RESPONSE_MAGIC = b"ISRr"
PACK_ID_SIZE = 32
#: Chunks per request; a batch is split into requests of at most this many.
MAX_WANTS = 64
#: Largest encoded chunk (a full chunk plus the AEAD's overhead, with room to spare).
MAX_CHUNK = CHUNK_SIZE + 4096
#: The most a response can carry: what a reader may ever have to hold for one request.
MAX_RESPONSE = MAX_WANTS * MAX_CHUNK
#: The length that says "not held".
ABSENT = 0xFFFFFFFF

_REQ_HEAD = struct.Struct("<4sBH")
_WANT = struct.Struct(f"<{TAG_SIZE}s{PACK_ID_SIZE}sQI")
_RESP_HEAD = struct.Struct("<4sBBH")
_LEN = struct.Struct("<I")

REQUEST_HEAD_SIZE = _REQ_HEAD.size
WANT_SIZE = _WANT.size
RESPONSE_HEAD_SIZE = _RESP_HEAD.size
LENGTH_SIZE = _LEN.size


class Status(enum.IntEnum):
    OK = 0
    BAD_REQUEST = 1  # malformed or over the bounds
    UNSUPPORTED = 2  # a protocol version this peer does not speak
    BUSY = 3  # too many connections now: ask another source
    ERROR = 4  # the peer failed reading its own cache


@dataclass(frozen=True)
class Want:
    """One chunk asked for, with where the home server's index says it sits."""

    tag: bytes
    pack_id: bytes
    offset: int
    length: int


def encode_request(wants: Sequence[Want]) -> bytes:
    if not 1 <= len(wants) <= MAX_WANTS:
        raise ValueError(f"a direct request asks 1 to {MAX_WANTS} chunks, not {len(wants)}")
    parts = [_REQ_HEAD.pack(REQUEST_MAGIC, VERSION, len(wants))]
    for w in wants:
        if len(w.tag) != TAG_SIZE or len(w.pack_id) != PACK_ID_SIZE or not 0 < w.length <= MAX_CHUNK:
            raise ValueError("a direct request's chunk is malformed")
        parts.append(_WANT.pack(w.tag, w.pack_id, w.offset, w.length))
    return b"".join(parts)


def decode_request_head(head: bytes) -> int:
    """The number of wants that follow; FormatError / UnsupportedVersion on anything else."""
    magic, version, count = _REQ_HEAD.unpack(head)
    if magic != REQUEST_MAGIC:
        raise FormatError("not an isrsync direct request")
    if version != VERSION:
        raise UnsupportedVersion(f"direct request version {version}, this peer speaks {VERSION}")
    if not 1 <= count <= MAX_WANTS:
        raise FormatError(f"a direct request asks 1 to {MAX_WANTS} chunks, not {count}")
    return count


def decode_wants(body: bytes, count: int) -> list[Want]:
    if len(body) != count * WANT_SIZE:
        raise FormatError("a direct request is cut short")
    out = []
    for i in range(count):
        tag, pack_id, offset, length = _WANT.unpack_from(body, i * WANT_SIZE)
        if not 0 < length <= MAX_CHUNK or offset > 2**62:
            raise FormatError("a direct request's chunk length or offset is out of range")
        out.append(Want(tag, pack_id, offset, length))
    return out


def encode_response_head(status: Status, count: int) -> bytes:
    return _RESP_HEAD.pack(RESPONSE_MAGIC, VERSION, int(status), count)


def encode_answer(data: bytes | None) -> bytes:
    return _LEN.pack(ABSENT if data is None else len(data))


def decode_response_head(head: bytes, asked: int) -> Status:
    """The status; FormatError if the head is not one for a request of ``asked`` chunks."""
    magic, version, status, count = _RESP_HEAD.unpack(head)
    if magic != RESPONSE_MAGIC:
        raise FormatError("the peer's answer is not an isrsync direct response")
    if version != VERSION:
        raise UnsupportedVersion(f"the peer answers direct version {version}, this isrsync speaks {VERSION}")
    try:
        st = Status(status)
    except ValueError:
        raise FormatError(f"the peer's answer has an unknown status {status}") from None
    if count != (asked if st is Status.OK else 0):
        raise FormatError(f"the peer answers {count} chunks to a request of {asked}")
    return st


def decode_length(raw: bytes) -> int | None:
    """A chunk's length (None: not held); FormatError past :data:`MAX_CHUNK`."""
    (n,) = _LEN.unpack(raw)
    if n == ABSENT:
        return None
    if n > MAX_CHUNK:
        raise FormatError(f"the peer announces a {n}-byte chunk (at most {MAX_CHUNK})")
    return n
