"""Where resumable pack uploads wait for their last byte.

:class:`DirPartials` is the embedded default and what the server always did:
one ``uploads/<user>/<pack>.part`` file per upload in ``--data``, appended to
in place. It is shared between fronts only if ``--data`` is.

:class:`SharedPartials` is for fronts that share nothing but the database and
the bucket (``--metadata postgresql://… --packs s3://…``). Each request's body
lands first in a temporary file on the front that took it; when the body ends
(whole, cut or stalled) what arrived becomes an object of its own,
``uploads/<user>/<pack>/<start>-<random>``, and a row of ``upload_parts``. The
row is written only if the piece starts where the upload stands, checked under
the writer lock, so two fronts appending at once cannot both win and the pieces
of one upload are always contiguous. When the last byte is in, the front that
took it joins the pieces into a local file, which is verified against the
pack's id and placed exactly as a directory upload is.

Staged objects, not S3 multipart uploads: a multipart part must be at least
5 MiB unless it is the last, and a body cut by a lost connection is any size.

A front killed mid-request loses only its temporary file: the upload resumes
from the last recorded piece. Killed between writing a piece's object and its
row, it leaves an object no row names; :meth:`SharedPartials.sweep` deletes such
objects once they are older than the idle limit, as it deletes pieces of
uploads nobody continued. Nothing of a partial upload is ever a pack: a pack
object is written only after the whole pack verified.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Collection, Protocol

from ..errors import Conflict
from ..fsutil import os_error
from .limits import trim_partials

if TYPE_CHECKING:
    from .db import Database
    from .packstore import PackStore
    from .s3packs import S3PackStore


@dataclass(frozen=True)
class Receiving:
    """Where one request's body is appended: ``path``, ``base`` bytes long before it."""

    path: Path
    base: int


class Partials(Protocol):
    #: True when any front sees every upload (the parts are in the shared backend)
    shared: bool

    def offset(self, user: str, pack: bytes) -> int: ...
    def receiving(self, user: str, pack: bytes, have: int) -> Receiving: ...
    def keep(self, user: str, pack: bytes, have: int, recv: Receiving) -> int: ...
    def discard(self, recv: Receiving) -> None: ...
    def assemble(self, user: str, pack: bytes) -> Path: ...
    def drop(self, user: str, pack: bytes) -> None: ...
    def trim(self, user: str, keep: int, busy: Collection[bytes]) -> int: ...
    def sweep(self, cutoff: float) -> int: ...


class DirPartials:
    shared = False

    def __init__(self, packs: PackStore) -> None:
        self._packs = packs

    def _path(self, user: str, pack: bytes) -> Path:
        return self._packs.upload_dir(user) / f"{pack.hex()}.part"

    def offset(self, user: str, pack: bytes) -> int:
        try:
            return self._path(user, pack).stat().st_size
        except FileNotFoundError:
            return 0

    def receiving(self, user: str, pack: bytes, have: int) -> Receiving:
        return Receiving(self._path(user, pack), have)

    def keep(self, user: str, pack: bytes, have: int, recv: Receiving) -> int:
        return self.offset(user, pack)  # appended in place: nothing to move

    def discard(self, recv: Receiving) -> None:
        pass  # the refused body was already cut off the file

    def assemble(self, user: str, pack: bytes) -> Path:
        return self._path(user, pack)

    def drop(self, user: str, pack: bytes) -> None:
        self._path(user, pack).unlink(missing_ok=True)

    def trim(self, user: str, keep: int, busy: Collection[bytes]) -> int:
        return trim_partials(self._packs.upload_dir(user), keep, {f"{p.hex()}.part" for p in busy})

    def sweep(self, cutoff: float) -> int:
        removed = 0
        for f in self._packs.uploads_root().glob("*/*.part"):
            with contextlib.suppress(FileNotFoundError):
                if f.stat().st_mtime < cutoff:
                    f.unlink()
                    removed += 1
        return removed


class SharedPartials:
    shared = True

    def __init__(self, store: S3PackStore, db: Database) -> None:
        self._s3 = store
        self._db = db

    def offset(self, user: str, pack: bytes) -> int:
        rows = self._db.q('SELECT COALESCE(MAX(start + length), 0) FROM upload_parts WHERE "user"=? AND pack=?',
                          (user, pack))
        return int(rows[0][0])

    def receiving(self, user: str, pack: bytes, have: int) -> Receiving:
        tmp = self._s3.upload_dir(user) / f".recv-{secrets.token_hex(8)}.tmp"
        try:
            tmp.touch(mode=0o600)
        except OSError as e:
            raise os_error(e, "an upload") from e
        return Receiving(tmp, 0)

    def keep(self, user: str, pack: bytes, have: int, recv: Receiving) -> int:
        """Record what arrived as the piece at ``have``; returns the upload's offset.

        Raises :class:`Conflict` (with the offset in ``details``) when another
        front moved the upload on meanwhile: this piece is dropped.
        """
        try:
            n = recv.path.stat().st_size
            if n == 0:
                return self.offset(user, pack)
            key = f"uploads/{user}/{pack.hex()}/{have:020d}-{secrets.token_hex(6)}"
            self._s3.put_object(key, recv.path)
        finally:
            recv.path.unlink(missing_ok=True)
        with self._db.tx() as c:
            now = c.execute('SELECT COALESCE(MAX(start + length), 0) FROM upload_parts WHERE "user"=? AND pack=?',
                            (user, pack)).fetchone()[0]
            if now == have:
                c.execute('INSERT INTO upload_parts VALUES (?,?,?,?,?,?)', (user, pack, have, n, key, time.time()))
                return have + n
        self._s3.delete_object(key)
        raise Conflict(f"upload is at offset {now}, not {have}", hint="resume from the offset",
                       details={"offset": int(now)})

    def discard(self, recv: Receiving) -> None:
        recv.path.unlink(missing_ok=True)

    def _parts(self, user: str, pack: bytes) -> list[tuple[int, int, str]]:
        return [(int(a), int(b), str(k)) for a, b, k in self._db.q(
            'SELECT start, length, object FROM upload_parts WHERE "user"=? AND pack=? ORDER BY start', (user, pack))]

    def assemble(self, user: str, pack: bytes) -> Path:
        """Join the pieces into one local file (the caller verifies and places it)."""
        out = self._s3.upload_dir(user) / f".join-{secrets.token_hex(8)}.tmp"
        at = 0
        try:
            with open(out, "wb") as f:
                for start, length, key in self._parts(user, pack):
                    if start != at:
                        raise Conflict("the partial upload changed while it was being joined",
                                       hint="resume the upload", details={"offset": at})
                    try:
                        got = self._s3.copy_object_to(key, f)
                    except FileNotFoundError:
                        raise Conflict("a piece of the partial upload is gone (swept as idle)",
                                       hint="upload the pack again", details={"offset": 0}) from None
                    if got != length:
                        raise Conflict(f"a piece of the partial upload holds {got} bytes, not {length}",
                                       hint="upload the pack again", details={"offset": 0})
                    at += length
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            out.unlink(missing_ok=True)
            raise
        return out

    def drop(self, user: str, pack: bytes) -> None:
        with self._db.tx() as c:
            keys = [r[0] for r in c.execute(
                'SELECT object FROM upload_parts WHERE "user"=? AND pack=?', (user, pack)).fetchall()]
            c.execute('DELETE FROM upload_parts WHERE "user"=? AND pack=?', (user, pack))
        for k in keys:
            self._s3.delete_object(k)

    def trim(self, user: str, keep: int, busy: Collection[bytes]) -> int:
        uploads = self._db.q('SELECT pack, MAX(time) FROM upload_parts WHERE "user"=? GROUP BY pack ORDER BY 2',
                             (user,))
        excess = len(uploads) - (keep - 1)
        idle = [bytes(p) for p, _ in uploads if bytes(p) not in busy]
        for p in idle[: max(0, excess)]:
            self.drop(user, p)
        return max(0, min(excess, len(idle)))

    def sweep(self, cutoff: float) -> int:
        """Drop uploads whose last piece came before ``cutoff``, and objects
        under ``uploads/`` that no row names (a front died between the two)."""
        removed = 0
        for user, pack in self._db.q('SELECT "user", pack FROM upload_parts GROUP BY "user", pack '
                                     "HAVING MAX(time) < ?", (cutoff,)):
            self.drop(user, bytes(pack))
            removed += 1
        named = {r[0] for r in self._db.q("SELECT object FROM upload_parts")}
        for key, mtime in list(self._s3.objects("uploads/")):
            if key not in named and mtime < cutoff:
                self._s3.delete_object(key)
                removed += 1
        return removed
