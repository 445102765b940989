"""Who the user is at this site: server, token, and their unlocked keys.

``isrsync login SERVER --user NAME`` records the server and the bearer token in
the user's config file (mode 0600) and unlocks the key bundle with the
passphrase. The unlocked bundle is kept for the login session only, in the
runtime directory (``$XDG_RUNTIME_DIR``, else ``/dev/shm``: memory-backed,
gone at reboot), never in the cache or the config; ``logout`` deletes it.

A home can also be a directory (``file:///path``), served by a LocalStore in
process: the demo's embedded home, or a share mounted at every site.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

import platformdirs

from ..errors import AuthError, Conflict, UsageError
from ..fsutil import atomic_write
from ..keys import KdfLimits, KeyBundle, SealKey
from ..store.base import Store
from ..store.http import HttpStore
from ..server.local import LocalStore

ENV_CONFIG = "ISRSYNC_CONFIG"
ENV_RUNTIME = "ISRSYNC_RUNTIME"


@dataclass
class Account:
    server: str
    user: str
    token: str = ""
    cacert: str | None = None


def config_path() -> Path:
    if os.environ.get(ENV_CONFIG):
        return Path(os.environ[ENV_CONFIG])
    return Path(platformdirs.user_config_dir("isrsync")) / "config.json"


def runtime_dir() -> Path:
    base = os.environ.get(ENV_RUNTIME) or os.environ.get("XDG_RUNTIME_DIR")
    if base:
        d = Path(base) / "isrsync" if not os.environ.get(ENV_RUNTIME) else Path(base)
    else:
        d = Path("/dev/shm") / f"isrsync-{os.getuid()}"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    return d


def load_account() -> Account:
    p = config_path()
    try:
        return Account(**json.loads(p.read_text()))
    except FileNotFoundError:
        raise AuthError("you are not logged in", hint="run `isrsync login SERVER --user NAME`") from None
    except (ValueError, TypeError):
        raise UsageError(f"{p} is damaged", hint="log in again with `isrsync login`") from None


def save_account(acct: Account) -> None:
    p = config_path()
    p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(p, json.dumps(asdict(acct), indent=2).encode(), mode=0o600)


def open_store(acct: Account) -> Store:
    parts = urlsplit(acct.server)
    if parts.scheme == "file":
        # The directory must already be a home (made by `isrsync server add-user`):
        # a mistyped path is refused, never made into a new, empty home.
        return LocalStore.open(Path(parts.path), acct.user, create=False, create_user=True)
    if parts.scheme in ("http", "https"):
        # Without a token (a site that took a parcel off a medium and never logged
        # in) the store still opens: offline, every call is Unreachable as it should
        # be; online, the server refuses it with a line that says to log in.
        return HttpStore(acct.server, acct.token, cafile=acct.cacert)
    raise UsageError(f"{acct.server!r} is not an http://, https:// or file:// home")


def in_the_clear(server: str) -> bool:
    """True when a login to ``server`` would send the token unencrypted past this machine:
    plain http to anything but a loopback address (a server on this host, or a test's)."""
    parts = urlsplit(server)
    if parts.scheme != "http":
        return False
    host = (parts.hostname or "").strip("[]")
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a name: it may resolve anywhere


def _session_file(acct: Account) -> Path:
    who = hashlib.blake2b(f"{acct.server}\0{acct.user}".encode(), digest_size=8).hexdigest()
    return runtime_dir() / f"keys-{who}.json"


async def login(acct: Account, passphrase: str, *, limits: KdfLimits | None = None) -> tuple[KeyBundle, bool]:
    """Unlock (or, on first login, create) the user's key bundle.

    Returns the bundle and whether it was created now.
    """
    store = open_store(acct)
    try:
        sealed = await store.get_key_bundle()
        created = sealed is None
        if created:
            bundle = KeyBundle.new()
            sk = await asyncio.to_thread(SealKey.derive, passphrase, limits)
            await store.put_key_bundle(bundle.seal_with(sk), None)
        else:
            bundle, sk = await asyncio.to_thread(KeyBundle.unseal_keyed, sealed, passphrase)
    finally:
        await store.close()
    save_account(acct)
    remember(acct, bundle, sk)
    return bundle, created


def remember(acct: Account, bundle: KeyBundle, sk: SealKey) -> None:
    doc = {"bundle": json.loads(bundle.to_json()), "seal": sk.to_json()}
    atomic_write(_session_file(acct), json.dumps(doc).encode(), mode=0o600)


def session_keys(acct: Account) -> tuple[KeyBundle, SealKey]:
    try:
        doc = json.loads(_session_file(acct).read_bytes())
        return KeyBundle.from_json(json.dumps(doc["bundle"]).encode()), SealKey.from_json(doc["seal"])
    except FileNotFoundError:
        raise AuthError(
            "your keys are not unlocked in this session", hint="run `isrsync login` with your passphrase"
        ) from None
    except (ValueError, KeyError, TypeError):
        raise AuthError("the unlocked keys of this session are damaged", hint="run `isrsync login` again") from None


def logout() -> bool:
    """Forget the unlocked keys and the token. Returns whether anything was forgotten."""
    try:
        acct = load_account()
    except (AuthError, UsageError):
        return False
    with contextlib.suppress(FileNotFoundError):
        _session_file(acct).unlink()
    acct.token = ""
    save_account(acct)
    return True


async def add_parcel_key(store: Store, acct: Account, parcel: str, key: bytes) -> KeyBundle:
    """Record a new parcel's master key in the sealed bundle on the server.

    Re-sealed here under the session's derived key; the server compare-and-sets
    the opaque bytes, so two sites creating parcels at once never lose a key.
    """
    _, sk = session_keys(acct)
    for _ in range(8):
        sealed = await store.get_key_bundle()
        if sealed is None:
            raise AuthError("the server has no key bundle for you", hint="run `isrsync login` again")
        current = KeyBundle.unseal_with(sealed, sk)
        current.parcels[parcel] = key
        try:
            await store.put_key_bundle(current.seal_with(sk), hashlib.blake2b(sealed, digest_size=32).digest())
        except Conflict:
            continue
        remember(acct, current, sk)
        return current
    raise Conflict("the key bundle kept changing on the server", hint="try again")

