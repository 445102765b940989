"""A key bundle that follows the user (issue "What the user sees and can recover", part 7):
a parcel created at another site after this site's login resumes here without a new
login. The bundle is refreshed from the server with the session's key; only a bundle that
really lacks the key is an error, and the error says which case it is."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pytest

from isrsync.errors import AuthError, IntegrityError
from isrsync.keys import KdfLimits, SealKey, new_master_key
from isrsync.server.local import LocalStore
from isrsync.site import account
from isrsync.site.cache import SiteCache
from isrsync.site.parcel import open_site


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    LocalStore.open(h, "alice", create=True, create_user=True).repo.close()
    return h


async def _login_at(site_dir: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> account.Account:
    """Be the site whose config and unlocked keys live under ``site_dir``."""
    monkeypatch.setenv(account.ENV_CONFIG, str(site_dir / "config.json"))
    monkeypatch.setenv(account.ENV_RUNTIME, str(site_dir / "run"))
    acct = account.Account(f"file://{home}", "alice")
    if not (site_dir / "config.json").exists():
        await account.login(acct, "pw", limits=KdfLimits.MIN)
    return acct


async def test_a_parcel_made_elsewhere_after_login_opens_without_a_new_login(
    tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    acct_a = await _login_at(tmp_path / "a", home, monkeypatch)
    acct_b = await _login_at(tmp_path / "b", home, monkeypatch)
    pid, key = uuid.uuid4(), new_master_key()
    store = account.open_store(acct_b)
    try:
        await account.add_parcel_key(store, acct_b, str(pid), key)  # "init" at site B
    finally:
        await store.close()

    await _login_at(tmp_path / "a", home, monkeypatch)  # back at site A, whose session predates the parcel
    site = await open_site(SiteCache(tmp_path / "a" / "cache"), acct_a)
    try:
        with pytest.raises(IntegrityError):
            site.master_key(pid)
        await site.ensure_key(pid)
        assert site.master_key(pid) == key
        # The refreshed bundle is this session's from now on: the next command needs no fetch.
        assert account.session_keys(acct_a)[0].parcels[str(pid)] == key

        # A parcel the server's bundle lacks too: said as such, not "out of date".
        other = uuid.uuid4()
        with pytest.raises(IntegrityError, match="even as the server has it now"):
            await site.ensure_key(other)
    finally:
        await site.close()


async def test_a_bundle_resealed_under_another_passphrase_asks_for_a_login(
    tmp_path: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    acct_a = await _login_at(tmp_path / "a", home, monkeypatch)
    store = account.open_store(acct_a)
    try:
        sealed = await store.get_key_bundle()
        assert sealed is not None
        bundle, _ = account.session_keys(acct_a)
        pid = uuid.uuid4()
        bundle.parcels[str(pid)] = new_master_key()
        # Another site changed the passphrase (a new salt) and added a parcel.
        await store.put_key_bundle(bundle.seal_with(SealKey.derive("new passphrase", KdfLimits.MIN)),
                                   hashlib.blake2b(sealed, digest_size=32).digest())
    finally:
        await store.close()
    site = await open_site(SiteCache(tmp_path / "a" / "cache"), acct_a)
    try:
        with pytest.raises(AuthError, match="another passphrase"):
            await site.ensure_key(pid)
    finally:
        await site.close()
