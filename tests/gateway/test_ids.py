"""A request's ids: version 7 UUIDs, time-ordered, never repeated, in a forked child neither."""

from __future__ import annotations

import os
import time
import uuid

from llmsvc.gateway.ids import BLOCK, new_id


def test_ids_are_version_7_uuids_of_their_millisecond_none_repeated_across_blocks() -> None:
    before = time.time_ns() // 1_000_000
    ids = [new_id() for _ in range(3 * BLOCK // 16 + 5)]  # past three reads of randomness
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == len(ids)
    assert {(i.version, i.variant) for i in ids} == {(7, uuid.RFC_4122)}
    made = [i.int >> 80 for i in ids]  # RFC 9562: the first 48 bits are Unix milliseconds
    assert before <= min(made)
    assert max(made) <= after
    assert made == sorted(made)
    random_bits = {i.int & ((1 << 62) - 1) for i in ids}
    assert len({b >> 46 for b in random_bits}) > len(ids) // 2  # not one counter's neighbours


def test_a_later_id_sorts_after_an_earlier_one_in_the_store_s_order() -> None:
    first = new_id()
    time.sleep(0.002)
    assert str(first) < str(new_id())  # the text form (SQLite) sorts by time as the bytes do


def test_a_forked_child_does_not_make_the_ids_its_parent_makes_next() -> None:
    new_id()  # a block read, most of it left
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.close(read)
        os.write(write, b"".join(new_id().bytes for _ in range(8)))
        os._exit(0)
    os.close(write)
    child = b""
    while chunk := os.read(read, 4096):
        child += chunk
    os.close(read)
    os.waitpid(pid, 0)
    parents = {new_id().bytes for _ in range(8)}
    childs = {child[i : i + 16] for i in range(0, len(child), 16)}
    assert len(childs) == 8
    assert not parents & childs
