"""The one exception tree of isrsync.

Every error a user can meet is an :class:`IsrError` subclass that knows its own
one-line message (what happened, what to do) and the process exit code the CLI
returns for it. Code below the CLI raises these; the CLI prints ``str(err)`` and
exits with ``err.exit_code`` (a traceback only with ``--debug``).
"""

from __future__ import annotations


class IsrError(Exception):
    """Base of every isrsync error.

    ``message`` says what happened; ``hint`` says what the user can do. Both are
    joined into the single line the CLI prints.
    """

    exit_code = 1
    hint = ""

    def __init__(
        self, message: str, *, hint: str | None = None, details: dict | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        if hint is not None:
            self.hint = hint
        # Structured facts (a lock holder, say) for --json output and the HTTP API.
        self.details: dict = details or {}

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class UsageError(IsrError):
    """The command line or configuration asks for something impossible."""

    exit_code = 2


class IntegrityError(IsrError):
    """Bytes failed verification: a tag, an AEAD tag, a hash or a checksum.

    Never fatal to a guest: a chunk source that returns bad bytes is skipped and
    the next one is asked. Fatal only when nothing else can be trusted.
    """

    exit_code = 3
    hint = "the data is damaged or was tampered with; nothing was changed"


class FormatError(IntegrityError):
    """A file or message is truncated, has the wrong magic, or is malformed."""

    hint = "the file is truncated or is not what it claims to be; nothing was changed"


class UnsupportedVersion(FormatError):
    """A well-formed file of a format version this isrsync does not understand."""

    hint = "upgrade isrsync to read it"


class WrongPassphrase(IsrError):
    """The passphrase does not open the key bundle."""

    exit_code = 4
    hint = "check the passphrase and try again"


class NotFound(IsrError):
    """A parcel, version, chunk, pack or user does not exist (or is not yours)."""

    exit_code = 5


class LockHeld(IsrError):
    """The parcel's lock is held by another site."""

    exit_code = 6
    hint = "suspend it there first, or break the lock with `isrsync lock break` if that site is lost"


class Conflict(IsrError):
    """A compare-and-set failed: stale epoch (fenced off) or stale parent version."""

    exit_code = 7
    hint = "your local changes are kept at this site; nothing on the server was changed"


class Unreachable(IsrError):
    """The home server (or another needed peer) cannot be reached."""

    exit_code = 8
    hint = "check the network and the server address; local state is kept"


class Busy(Unreachable):
    """The server is at one of its limits (open connections, concurrent uploads):
    the request was not served, and nothing was changed."""

    hint = "try again in a moment; nothing was changed"


class TooManyUploads(Busy):
    """This user already has as many uploads in progress as the server allows."""

    hint = "wait for an upload to finish, then send this one; nothing was changed"


class RequestTimeout(Unreachable):
    """A request's headers or body stopped arriving and the server gave up on it."""

    hint = "send it again; an upload resumes from the offset the server reports"


class BodyCut(Unreachable):
    """The client's connection closed before the request body it declared had all arrived."""

    hint = "send it again; an upload resumes from the offset the server reports"


class PeerUnreachable(Unreachable):
    """A LAN peer did not answer a direct chunk request: gone, stalled, busy, or
    answering nonsense. Never fatal: the miss falls through to the next source."""

    hint = "nothing to do: the chunk is fetched from another peer or the home server"


class ChunkUnavailable(Unreachable):
    """No source (cache, medium, peer, home server) could supply a chunk the guest needs."""

    hint = "reconnect to the home server or plug in a medium that holds the parcel"


class ChunkSlow(ChunkUnavailable):
    """A chunk was not had in time because a source that may hold it did not answer
    in time (a slow link, a busy server), not because no source holds it."""

    hint = "the link is slow or the server busy; isrsync keeps asking"


class ChunkLate(ChunkSlow):
    """A chunk's request is past its deadline but still running: asking again waits
    on the same request (nothing is fetched twice)."""


class DamagedChunk(ChunkUnavailable):
    """The home server sent a chunk that failed its tag check, and no source had a good copy.

    Not a network problem: the server's copy is damaged (``isrsync server check`` finds it)."""

    hint = ("run `isrsync server check` on the home server: it finds the damaged pack; "
            "no damaged byte reached the guest")


class UnsupportedEncoding(UsageError):
    """A request body sent compressed (``Content-Encoding``): the API takes bodies as they are."""

    hint = "send the body without Content-Encoding; packs are already compressed and encrypted"


class StorageFull(IsrError):
    """A disk filled up while writing; what was being written was discarded."""

    exit_code = 9
    hint = "free some space and try again; nothing already stored was lost"


class CacheError(IsrError):
    """The site cache cannot be opened or used (permissions, damage, lock)."""

    exit_code = 10


class QemuError(IsrError):
    """QEMU failed to start, died, or refused a command."""

    exit_code = 11


class AuthError(IsrError):
    """Missing, unknown or wrong credentials for the home server."""

    exit_code = 12
    hint = "log in again with `isrsync login`"


class StateError(IsrError):
    """A parcel's local state does not allow what was asked (e.g. suspending one that is not running)."""

    exit_code = 13


class MediumError(IsrError):
    """A medium (USB key, SD card, DVD, directory) cannot be read or written as a whole.

    Never fatal to a guest: a medium is only ever a lookaside source, so reads
    fall through to the next source; this is what a medium *command* reports.
    """

    exit_code = 14


class DiscoveryError(IsrError):
    """LAN discovery (mDNS) cannot start: no such interface address, or the mDNS port is unusable.

    Never fatal to a guest: LAN peers are only ever lookaside sources; this is what
    `isrsync peers` (or a site that wanted to announce) reports.
    """

    exit_code = 15
    hint = "check --interface (an IPv4 address of this host) and that UDP port 5353 is free to join"
