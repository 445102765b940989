"""The local parcel state as a state machine: legal moves, refused moves, staged rows,
and the commit that resets everything it covers in one transaction."""

from __future__ import annotations

import json
import os
import sqlite3
import uuid
from pathlib import Path

import pytest

from isrsync.chunk import encode
from isrsync.errors import Conflict, StateError
from isrsync.site.cache import SiteCache
from isrsync.site.state import LocalStatus, ParcelState


@pytest.fixture
def state(tmp_path: Path):
    cache = SiteCache(tmp_path / "cache")
    st = ParcelState(cache, uuid.uuid4(), os.urandom(32))
    yield st
    st.close()
    cache.close()


def _ref(secret: bytes = b"s" * 32):
    return encode(os.urandom(4096), secret).ref


def test_a_new_parcel_is_idle_and_a_resume_runs_it(state: ParcelState) -> None:
    assert state.status is LocalStatus.IDLE and state.info().base is None
    state.start_running(3, 7, "host-a")
    info = state.info()
    assert (info.status, info.base, info.epoch, info.host) == (LocalStatus.RUNNING, 3, 7, "host-a")
    assert info.status.has_lock


def test_suspend_locally_then_commit_releases_and_resets_what_it_covers(state: ParcelState) -> None:
    state.start_running(1, 1, "h")
    state.set_dirty({0: _ref(), 5: _ref()})
    state.stage([b"p" * 32], [b"t" * 32])
    state.suspended_locally()
    assert state.status is LocalStatus.SUSPENDED_LOCAL
    state.committed(2, released=True)
    assert state.status is LocalStatus.IDLE and state.info().base == 2
    assert state.dirty() == {} and state.staged() == ([], set()) and state.load_memory() is None


def test_a_sync_keeps_the_dirty_rows_written_after_its_snapshot(state: ParcelState) -> None:
    state.start_running(1, 1, "h")
    state.set_dirty({0: _ref(), 1: _ref(), 2: _ref()})
    state.committed(2, released=False, running=True, done=[0, 2])
    assert state.status is LocalStatus.RUNNING and set(state.dirty()) == {1}


def test_keep_lock_leaves_it_held(state: ParcelState) -> None:
    state.start_running(1, 1, "h")
    state.suspended_locally()
    state.committed(2, released=False)
    assert state.status is LocalStatus.HELD and state.status.has_lock
    state.start_running(2, 1, "h")  # resumed again here under the same lock


def test_illegal_moves_are_refused_and_change_nothing(state: ParcelState) -> None:
    with pytest.raises(StateError, match="idle"):
        state.suspended_locally()
    with pytest.raises(StateError):
        state.committed(2, released=True)
    with pytest.raises(StateError):
        state.fenced()
    assert state.status is LocalStatus.IDLE


def test_fenced_changes_are_kept_refused_and_dropped_only_by_discard(state: ParcelState) -> None:
    state.start_running(1, 4, "h")
    state.set_dirty({3: _ref()})
    state.fenced()
    assert state.status is LocalStatus.FENCED and not state.status.has_lock
    with pytest.raises(Conflict, match="fenced off") as e:
        state.start_running(1, 5, "h")
    assert "isrsync discard" in str(e.value)
    with pytest.raises(Conflict):
        state.committed(2, released=True)
    state.suspended_locally()  # saving a fenced guest keeps it fenced
    assert state.status is LocalStatus.FENCED and set(state.dirty()) == {3}
    assert state.discarded() == 1
    assert state.status is LocalStatus.IDLE and state.dirty() == {}


def test_staged_packs_are_rows_and_old_json_lists_are_migrated(tmp_path: Path) -> None:
    cache = SiteCache(tmp_path / "cache")
    pid, key = uuid.uuid4(), os.urandom(32)
    st = ParcelState(cache, pid, key)
    st.start_running(1, 1, "h")
    st.close()
    # A state written by an older isrsync: staging kept as JSON lists in meta.
    db = sqlite3.connect(cache.path / "parcels" / str(pid) / "state.db")
    with db:
        db.execute("INSERT OR REPLACE INTO meta VALUES ('staged', ?)", (json.dumps([(b"a" * 32).hex()]),))
        db.execute("INSERT OR REPLACE INTO meta VALUES ('staged_tags', ?)",
                   (json.dumps([(b"b" * 32).hex(), (b"c" * 32).hex()]),))
    db.close()
    st = ParcelState(cache, pid, key)
    assert st.staged() == ([b"a" * 32], {b"b" * 32, b"c" * 32})
    st.stage([b"d" * 32], [b"e" * 32])
    assert st.staged() == ([b"a" * 32, b"d" * 32], {b"b" * 32, b"c" * 32, b"e" * 32})
    st.close()
    db = sqlite3.connect(cache.path / "parcels" / str(pid) / "state.db")
    assert db.execute("SELECT COUNT(*) FROM meta WHERE key LIKE 'staged%'").fetchone()[0] == 0
    db.close()
    cache.close()
