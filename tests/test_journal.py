"""The change journal: durable appends, checkpoints, replay after a crash, compaction."""

from __future__ import annotations

import os

from mirror import journal as J


def test_append_checkpoint_replay(tmp_path):
    path = os.fsencode(tmp_path / "j")
    j = J.Journal(path)
    seq = j.append([(J.ENTRY, b"a", 0), (J.ENTRY, b"d", 1), (J.RENAME, b"x", b"y")])
    pending = j.pending()
    assert set(pending.entries) == {b"a", b"d", b"x", b"y"} and pending.trees == {b"d"}
    assert pending.renames == [(b"x", b"y")] and pending.seq == seq
    j.append([(J.ENTRY, b"later", 0)])
    j.checkpoint(seq)
    j.close()
    again = J.Journal(path)  # a restart replays what was not checkpointed
    assert set(again.pending().entries) == {b"later"} and again.replayed == 1


def test_torn_last_record_is_dropped(tmp_path):
    path = os.fsencode(tmp_path / "j")
    j = J.Journal(path)
    j.append([(J.ENTRY, b"kept", 0)])
    j.append([(J.ENTRY, b"torn", 0)])
    j.close()
    data = open(path, "rb").read()
    for cut in range(1, 12):
        with open(path, "wb") as f:
            f.write(data[:-cut])
        j = J.Journal(path)
        assert set(j.pending().entries) == {b"kept"}
        j.append([(J.ENTRY, b"after", 0)])  # appending after the cut works
        j.close()
        assert set(J.Journal(path).pending().entries) == {b"kept", b"after"}


def test_corrupt_byte_stops_replay_there(tmp_path):
    path = os.fsencode(tmp_path / "j")
    j = J.Journal(path)
    j.append([(J.ENTRY, b"one", 0)])
    size = j.size
    j.append([(J.ENTRY, b"two", 0)])
    j.close()
    data = bytearray(open(path, "rb").read())
    data[size + 14] ^= 0xFF
    open(path, "wb").write(bytes(data))
    assert set(J.Journal(path).pending().entries) == {b"one"}


def test_compaction_keeps_pending_and_sequence(tmp_path, monkeypatch):
    monkeypatch.setattr(J, "COMPACT_BYTES", 2000)
    path = os.fsencode(tmp_path / "j")
    j = J.Journal(path)
    for i in range(200):
        seq = j.append([(J.ENTRY, b"f%d" % i, 0)])
        if i < 199:
            j.checkpoint(seq)
    assert j.size < 2000 + 200
    assert set(j.pending().entries) == {b"f199"}
    j.close()
    again = J.Journal(path)
    assert set(again.pending().entries) == {b"f199"}
    assert again.append([(J.ENTRY, b"next", 0)]) > seq


def test_change_to_an_entry_in_flight_survives_the_checkpoint(tmp_path):
    """A file changed again while a session mirrors it (after the session read it) must stay
    pending past that session's checkpoint: the demo once lost an append this way."""
    j = J.Journal(os.fsencode(tmp_path / "j"))
    j.append([(J.ENTRY, b"notes.txt", 0)])
    j.append([(J.ENTRY, b"notes.txt", 0)])  # not taken yet: deduplicated
    assert j.pending().seq == 1
    batch = j.take()  # a session starts on it and reads notes.txt
    assert set(batch.entries) == {b"notes.txt"}
    j.append([(J.ENTRY, b"notes.txt", 0)])  # appended to meanwhile
    j.checkpoint(batch.seq)  # the session ends
    assert set(j.pending().entries) == {b"notes.txt"}
    j.append([(J.ENTRY, b"notes.txt", 0)])  # pending and not taken: deduplicated again
    assert j.pending().seq == 2


def test_a_change_kept_for_a_retry_keeps_its_first_seen_time_though_newer_events_came_first(tmp_path):
    """A file that keeps changing while it is copied fails ("changed while it was being
    copied") and is kept, with the time it was first seen, after the events its writer made
    during the session.  Its pending time must stay the first one: the lag (the status,
    hawrap's verdict on the standby) grows for as long as the file is not mirrored, instead
    of starting again from the newest write at every session."""
    j = J.Journal(os.fsencode(tmp_path / "j"))
    j.append([(J.ENTRY, b"log", 0)], when=100.0)
    batch = j.take()  # a session starts copying it
    j.append([(J.ENTRY, b"log", 0)], when=200.0)  # written again meanwhile
    j.append([(J.ENTRY, b"log", 0, 100.0)], force=True)  # the session failed it: kept
    j.checkpoint(batch.seq)
    assert j.pending().entries == {b"log": 100.0}
    j.close()


def test_what_one_destination_lacks_counts_even_when_another_had_it(tmp_path):
    """A former leader coming back after a double failure: the changes b confirmed are not
    on c, the new leader, and b is gone too; asked for what c lacks, they are listed
    beside those nobody had.  A destination never checkpointed lacks everything, and a
    journal with a single, unnamed destination answers for it."""
    path = os.fsencode(tmp_path / "j")
    j = J.Journal(path, cursors=(b"mail@b", b"mail@c"))
    first = j.append([(J.ENTRY, b"old", 0)])
    j.checkpoint(first, b"mail@c")
    confirmed = j.append([(J.ENTRY, b"confirmed-by-b", 0)])
    j.checkpoint(confirmed, b"mail@b")
    j.append([(J.ENTRY, b"nobody", 0)])
    j.close()
    assert set(J.read_pending(path, had_by_none=True).entries) == {b"nobody"}
    lacked = J.read_pending(path, had_by_none=True, lacking=b"mail@c")
    assert set(lacked.entries) == {b"confirmed-by-b", b"nobody"}
    assert set(J.read_pending(path, had_by_none=True, lacking=b"mail@d").entries) == {
        b"old", b"confirmed-by-b", b"nobody"}  # fmt: skip
    single = os.fsencode(tmp_path / "single")
    j = J.Journal(single)
    j.checkpoint(j.append([(J.ENTRY, b"had", 0)]))
    j.append([(J.ENTRY, b"not-had", 0)])
    j.close()
    assert set(J.read_pending(single, had_by_none=True, lacking=b"mail@c").entries) == {b"not-had"}


def test_settle_marks_everything_done_for_every_destination(tmp_path):
    """A journal whose changes were kept aside or given up (``hawrap resume``): nothing is
    pending afterwards for any of its destinations, and new changes journal on from there."""
    path = os.fsencode(tmp_path / "j")
    assert J.settle(path) == 0  # no journal: nothing to do, nothing made
    assert not os.path.exists(path)
    j = J.Journal(path, cursors=(b"b", b"c"))
    seq = j.append([(J.ENTRY, b"a", 0), (J.RENAME, b"x", b"y")])
    j.checkpoint(seq, b"b")  # mirrored to b only
    later = j.append([(J.ENTRY, b"later", 1)])
    j.close()
    assert set(J.read_pending(path).entries) == {b"a", b"x", b"y", b"later"}
    assert set(J.read_pending(path, had_by_none=True).entries) == {b"later"}  # b has the rest
    assert J.settle(path) == later
    assert not len(J.read_pending(path)) and J.settle(path) == 0
    again = J.Journal(path, cursors=(b"b", b"c"))
    assert not len(again.pending(cursor=b"b")) and not len(again.pending(cursor=b"c"))
    assert again.append([(J.ENTRY, b"new", 0)]) > later
    again.close()
    assert set(J.read_pending(path).entries) == {b"new"}


def test_records_carry_their_time_and_older_records_without_one_still_read(tmp_path):
    """A change record carries the time it was written (after the change it tells of); one
    from an older journal has none: it is still replayed, and tells no time."""
    import time

    import msgpack
    import xxhash

    path = os.fsencode(tmp_path / "j")
    body = msgpack.packb([1, J.ENTRY, b"old", 0], use_bin_type=True)
    with open(path, "wb") as f:
        f.write(J._HEADER.pack(len(body), xxhash.xxh3_64_intdigest(body)) + body)
    assert set(J.read_pending(path).entries) == {b"old"}  # replayed as ever
    before = time.time()
    j = J.Journal(path)
    seq = j.append([(J.ENTRY, b"new", 0), (J.RENAME, b"a", b"b")])
    assert all(before <= t <= time.time() for t in J.recorded_times(path)[0].values())
    later = j.append([(J.ENTRY, b"pending", 0)])
    taken = time.time()
    j.checkpoint(seq)  # mirrored: still in the file, with its time, until compacted
    j.close()
    times, whole = J.recorded_times(path)
    # seen until the checkpoint past their record: a session took them after any change since
    assert set(times) == {b"new", b"a", b"b", b"pending"} and later > seq
    assert all(taken <= times[p] <= time.time() for p in (b"new", b"a", b"b")) and times[b"pending"] < taken
    assert set(whole) == {b"b"}  # a rename's new name is a directory's whole, perhaps
    assert set(J.Journal(path).pending().entries) == {b"pending"}  # "old" was covered by the checkpoint too
    assert J.recorded_times(os.fsencode(tmp_path / "none")) == ({}, {})
