"""`isrsync site name`: the name a site goes by where lock holders are named (issue 13, part 8)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "isrsync.cli.main"]


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISRSYNC_")}
    env.update(ISRSYNC_CACHE=str(tmp_path / "cache"), COLUMNS="200")
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=60, check=False)


def test_the_name_defaults_to_the_host_name_and_can_be_set(tmp_path: Path) -> None:
    import socket

    first = json.loads(_run(tmp_path, "site", "name", "--json").stdout)
    assert first["name"] == socket.gethostname() and len(first["site"]) == 36
    r = _run(tmp_path, "site", "name", "lab 3 (window)")
    assert r.returncode == 0 and "this site is now lab 3 (window)" in r.stdout, r.stderr
    again = json.loads(_run(tmp_path, "site", "name", "--json").stdout)
    assert again == {"name": "lab 3 (window)", "site": first["site"]}


@pytest.mark.parametrize("bad", ["", "x" * 65, "two\nlines", "tab\there"])
def test_a_bad_name_is_one_line(tmp_path: Path, bad: str) -> None:
    r = _run(tmp_path, "site", "name", bad)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "site name" in r.stderr


async def test_the_lock_holder_carries_the_chosen_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from isrsync.keys import KdfLimits
    from isrsync.server.local import LocalStore
    from isrsync.site import account
    from isrsync.site.cache import SiteCache
    from isrsync.site.identity import set_site_name
    from isrsync.site.parcel import open_site

    home = tmp_path / "home"
    LocalStore.open(home, "alice", create=True, create_user=True).repo.close()
    monkeypatch.setenv(account.ENV_CONFIG, str(tmp_path / "config.json"))
    monkeypatch.setenv(account.ENV_RUNTIME, str(tmp_path / "run"))
    acct = account.Account(f"file://{home}", "alice")
    await account.login(acct, "pw", limits=KdfLimits.MIN)
    cache = SiteCache(tmp_path / "cache")
    set_site_name(cache.path, "lab-3")
    site = await open_site(cache, acct)
    try:
        assert site.holder().host == "lab-3"
        assert site.holder().describe() == f"lab-3 (site {site.site_id})"
    finally:
        await site.close()
