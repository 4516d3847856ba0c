"""The object directory on its own (no nodes): its answers and its indexes by session, login
and holder agree with the table after every kind of change."""

from __future__ import annotations

from pathlib import Path

import pytest

from hsmsim.cluster.directory import Directory
from hsmsim.cluster.journal import Journal


@pytest.fixture
def d(tmp_path: Path) -> Directory:
    return Directory(Journal(tmp_path / "journal"))


def test_closing_one_session_drops_only_its_objects(d: Directory) -> None:
    d.created([1, 2], [False, False], "hsm-a", login_id=7, session=10)
    d.created([3], [False], "hsm-b", login_id=7, session=11)
    d.created([4], [False], "hsm-a", login_id=8, session=10)  # same session number, other login
    d.created([5], [True], "hsm-a", login_id=7, session=10)  # token objects outlive sessions
    assert d.on_session_closed(10, 7) == {"hsm-a"}
    assert [h for h in (1, 2, 3, 4, 5) if h in d] == [3, 4, 5]
    assert d.session_holders(7) == {"hsm-b"}
    assert d.on_session_closed(10, 7) == set()  # nothing left to close
    # without a login (the gateway closing a dead client's session), every login's objects go
    assert d.on_session_closed(10, None) == {"hsm-a"}
    assert [h for h in (3, 4, 5) if h in d] == [3, 5]


def test_logout_drops_the_logins_session_objects_and_its_home(d: Directory) -> None:
    d.created([1], [False], "hsm-a", login_id=7, session=10)
    d.created([2], [False], "hsm-a", login_id=7, session=12)
    d.created([3], [False], "hsm-b", login_id=8, session=10)
    d.created([4], [True], "hsm-a", login_id=7, session=10)
    assert d.home(7) == "hsm-a" and d.home(8) == "hsm-b"
    d.on_logout(7)
    assert [h for h in (1, 2, 3, 4) if h in d] == [3, 4]
    assert d.home(7) is None and d.home(8) == "hsm-b"
    assert d.session_holders(7) == set()
    assert d.visible([1, 2, 3, 4], 8) == [3, 4]
    assert d.visible([1, 2, 3, 4], 7) == [4]


def test_holders_after_member_loss_and_removal(d: Directory) -> None:
    d.created([1], [True], "hsm-a", login_id=7, session=10)
    d.add_holder(1, "hsm-b")
    d.add_holder(1, "hsm-c")
    d.created([2], [False], "hsm-b", login_id=7, session=10)
    d.created([3], [True], "hsm-b", login_id=7, session=10)
    assert d.holders(1) == {"hsm-a", "hsm-b", "hsm-c"}
    # a lost HSM takes its session objects with it, never a token object's record
    assert d.on_member_lost("hsm-b") == [2]
    assert 2 not in d and d.holders(2) == frozenset()
    assert d.holders(1) == {"hsm-a", "hsm-b", "hsm-c"}
    assert d.holders(3) == {"hsm-b"}
    # a removed HSM holds nothing any more
    d.on_member_removed("hsm-b")
    assert d.holders(1) == {"hsm-a", "hsm-c"}
    assert 3 in d and d.holders(3) == frozenset()
    assert (d.held("hsm-a"), d.held("hsm-b"), d.held("hsm-c")) == (1, 0, 1)


def test_sync_lag_and_held_follow_the_holders(d: Directory) -> None:
    d.created([1, 2, 3], [True, True, False], "hsm-a", login_id=7, session=10)
    assert d.live_tokens() == {1, 2}
    assert (d.held("hsm-a"), d.sync_lag("hsm-a")) == (2, 0)
    assert (d.held("hsm-b"), d.sync_lag("hsm-b")) == (0, 2)
    d.add_holder(1, "hsm-b")
    d.add_holder(1, "hsm-b")  # twice: counted once
    assert (d.held("hsm-b"), d.sync_lag("hsm-b")) == (1, 1)
    d.discard_holder(1, "hsm-b")
    assert d.sync_lag("hsm-b") == 2
    d.tombstone(2)
    assert d.live_tokens() == {1}
    assert (d.held("hsm-a"), d.sync_lag("hsm-b")) == (1, 1)


def test_tombstones_are_journaled_and_hide_the_handle(d: Directory, tmp_path: Path) -> None:
    d.created([1, 2], [True, True], "hsm-a", login_id=7, session=10)
    removed = d.tombstone(1, 99)  # 99 was never recorded: journaled all the same
    assert [h for h, _ in removed] == [1]
    assert d.is_tombstoned(1) and d.is_tombstoned(99) and not d.is_tombstoned(2)
    assert d.get(1) is None and d.tombstone_count() == 2
    d.add_holder(1, "hsm-b")  # a late copy of a deleted object is not recorded
    assert 1 not in d
    assert not d.adopt(1, "hsm-b")  # nor adopted back from an HSM's inventory
    assert d.adopt(50, "hsm-b") and d.holders(50) == {"hsm-b"}
    assert not d.adopt(50, "hsm-c")  # known already
    # the journal keeps them across a restart
    again = Directory(Journal(tmp_path / "journal"))
    assert again.is_tombstoned(1) and again.is_tombstoned(99)


def test_rebuild_from_inventories_keeps_session_objects(d: Directory) -> None:
    d.created([1], [False], "hsm-a", login_id=7, session=10)
    d.created([2], [True], "hsm-a", login_id=7, session=10)
    d.tombstone(5)
    top = d.rebuild({"hsm-a": [3, 4, 5], "hsm-b": [3]})
    assert top == 5
    assert 2 not in d  # a token object no HSM has is gone
    assert d.holders(3) == {"hsm-a", "hsm-b"} and d.holders(4) == {"hsm-a"}
    assert 5 not in d  # deleted: not brought back
    assert 1 in d and d.session_holders(7) == {"hsm-a"}
    assert d.live_tokens() == {3, 4}
    assert (d.sync_lag("hsm-a"), d.sync_lag("hsm-b")) == (0, 1)
