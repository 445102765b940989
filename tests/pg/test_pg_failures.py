"""A front whose database goes away answers 503 with one line, never a 500,
and a front never writes the metadata address's password to its log."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pgkit


def _get(url: str, token: str) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_lost_database_is_a_503_not_a_500(server_factory, tmp_path) -> None:
    db = pgkit.FreshDb()
    try:
        srv = pgkit.with_metadata(server_factory(data=tmp_path / "d", extra=["--metadata", db.dsn]), db.dsn)
        token = srv.add_user("alice")
        assert _get(f"{srv.url}/v1/parcels", token)[0] == 200
        db.close()  # DROP DATABASE … WITH (FORCE): every front connection is cut
        for _ in range(2):  # the cut connection, then the pool's failed reconnect
            status, body = _get(f"{srv.url}/v1/parcels", token)
            assert status == 503, (status, body)
            assert "unreachable" in body["error"] and "\n" not in body["error"]
        assert srv.proc is not None and srv.proc.poll() is None, "the front must keep running"
    finally:
        db.close()


def test_the_metadata_password_is_not_logged(server_factory, tmp_path) -> None:
    db = pgkit.FreshDb()
    try:
        dsn = db.dsn.replace("isrsync@", "isrsync:n0t-in-logs@")  # trust auth ignores it
        srv = pgkit.with_metadata(server_factory(data=tmp_path / "d", extra=["--metadata", dsn]), dsn)
        token = srv.add_user("alice")
        assert _get(f"{srv.url}/v1/parcels", token)[0] == 200
        srv.stop()
        log = srv.log.read_text()
        assert "n0t-in-logs" not in log and token not in log
        assert "postgresql socket" in log
    finally:
        db.close()
