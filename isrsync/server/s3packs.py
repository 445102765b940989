"""Packs in S3-compatible object storage (``--packs s3://bucket/prefix?endpoint=…``).

obstore (Rust's object_store), not aiobotocore: one small wheel instead of
botocore, multipart upload chosen by size inside ``put``, range reads, and a
synchronous API as well as an async one. The repository's pack calls already
run on worker threads (as its database calls do), so the sync API keeps one
code path for the directory and S3; the event loop never waits on either.

Objects are named ``<prefix>/packs/ab/<pack id hex>``, written once, under the
metadata's writer lock, only after the pack verified against its id; deleted
only by prune and GC after the same liveness re-check as for a directory.
Partial uploads are objects under ``<prefix>/uploads/`` when the metadata is
in PostgreSQL (any front resumes them, :mod:`.partials`); beside SQLite they
stay in ``--data``.

Credentials and region come from the environment as for any S3 client
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_REGION``); the URL's query may set ``endpoint`` (MinIO, Ceph RGW, moto) and
``region``. Nothing here is specific to any one server.
"""

from __future__ import annotations

import contextlib
import secrets
import urllib.parse
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Iterator

from ..errors import Busy, UsageError
from ..store.names import check_user_name

READ_PIECE = 8 << 20


def parse_url(url: str) -> tuple[str, str, dict[str, str]]:
    u = urllib.parse.urlsplit(url)
    if u.username or u.password:
        raise UsageError("--packs must not carry credentials", hint="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if u.scheme != "s3" or not u.netloc:
        raise UsageError(f"--packs {url[:80]!r} is not s3://BUCKET[/PREFIX][?endpoint=URL&region=R]")
    q = dict(urllib.parse.parse_qsl(u.query))
    unknown = set(q) - {"endpoint", "region"}
    if unknown:
        raise UsageError(f"--packs: unknown option(s) {', '.join(sorted(unknown))}", hint="use endpoint= and region=")
    return u.netloc, u.path.strip("/"), q


UNAVAILABLE_HINT = "check that the object store runs, the --packs address and the credentials; retrying is safe"


class S3PackStore:
    local = False

    def __init__(self, url: str, root: Path) -> None:
        try:
            from obstore.store import S3Store
        except ImportError:
            raise UsageError("--packs s3://… needs obstore", hint="pip install 'isrsync[s3]'") from None
        bucket, prefix, q = parse_url(url)
        self.where = f"s3://{bucket}/{prefix}".rstrip("/")
        config: dict[str, Any] = {}
        if "endpoint" in q:
            config["endpoint"] = q["endpoint"]
            if q["endpoint"].startswith("http://"):
                config["allow_http"] = True
        if "region" in q:
            config["region"] = q["region"]
        self._s = S3Store(bucket, prefix=prefix or None, config=config)
        self.root = root
        (root / "uploads").mkdir(mode=0o700, parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _mapped(self) -> Iterator[None]:
        import obstore.exceptions as ox

        try:
            yield
        except FileNotFoundError:
            raise
        except (ox.BaseError, OSError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            # Busy: a 503 on the wire; nothing was recorded, so a retry is safe.
            raise Busy(f"the pack store {self.where} failed ({first})", hint=UNAVAILABLE_HINT) from None

    @staticmethod
    def key(pack_id: bytes) -> str:
        h = pack_id.hex()
        return f"packs/{h[:2]}/{h}"

    def path(self, pack_id: bytes) -> Path:
        # Only for messages: S3 objects have no local path.
        return Path(PurePosixPath(self.where.replace("s3://", "s3:/")) / self.key(pack_id))

    def size(self, pack_id: bytes) -> int | None:
        import obstore

        try:
            with self._mapped():
                return int(obstore.head(self._s, self.key(pack_id))["size"])
        except FileNotFoundError:
            return None

    def exists(self, pack_id: bytes) -> bool:
        return self.size(pack_id) is not None

    def place(self, pack_id: bytes, src: Path) -> None:
        """Upload a verified file under its content name (multipart when large)."""
        import obstore

        with self._mapped():
            obstore.put(self._s, self.key(pack_id), Path(src), chunk_size=16 << 20)
        Path(src).unlink(missing_ok=True)

    def read(self, pack_id: bytes, offset: int, length: int) -> bytes:
        import obstore

        if length <= 0:
            return b""
        with self._mapped():
            return bytes(obstore.get_range(self._s, self.key(pack_id), start=offset, length=length))

    def delete(self, pack_id: bytes) -> bool:
        import obstore

        if not self.exists(pack_id):
            return False
        with self._mapped():
            obstore.delete(self._s, self.key(pack_id))
        return True

    def names(self) -> Iterator[tuple[str, float]]:
        import obstore

        with self._mapped():
            for batch in obstore.list(self._s, prefix="packs/"):
                for meta in batch:
                    yield str(meta["path"]).rsplit("/", 1)[-1], meta["last_modified"].timestamp()

    @contextlib.contextmanager
    def local_copy(self, pack_id: bytes) -> Iterator[Path]:
        """The pack in a temporary local file (check and compaction read it whole)."""
        size = self.size(pack_id)
        if size is None:
            raise FileNotFoundError(self.key(pack_id))
        tmp = self.uploads_root() / f".get-{secrets.token_hex(8)}.tmp"
        try:
            with open(tmp, "wb") as f:
                for off in range(0, size, READ_PIECE):
                    f.write(self.read(pack_id, off, min(READ_PIECE, size - off)))
            yield tmp
        finally:
            tmp.unlink(missing_ok=True)

    # -- plain objects (the pieces of shared partial uploads, under uploads/) --

    def put_object(self, key: str, src: Path) -> None:
        import obstore

        with self._mapped():
            obstore.put(self._s, key, Path(src), chunk_size=16 << 20)

    def copy_object_to(self, key: str, f: BinaryIO) -> int:
        """Append the object's bytes to ``f``; returns how many."""
        import obstore

        n = 0
        with self._mapped():
            for piece in obstore.get(self._s, key).stream(min_chunk_size=READ_PIECE):
                f.write(piece)
                n += len(piece)
        return n

    def delete_object(self, key: str) -> None:
        import obstore

        with contextlib.suppress(FileNotFoundError), self._mapped():
            obstore.delete(self._s, key)

    def objects(self, prefix: str) -> Iterator[tuple[str, float]]:
        """Every object's key (relative to the store's prefix) and mtime under ``prefix``."""
        import obstore

        with self._mapped():
            for batch in obstore.list(self._s, prefix=prefix):
                for meta in batch:
                    yield str(meta["path"]), meta["last_modified"].timestamp()

    def upload_dir(self, user: str) -> Path:
        d = self.root / "uploads" / check_user_name(user)
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        return d

    def uploads_root(self) -> Path:
        return self.root / "uploads"
