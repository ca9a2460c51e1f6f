"""A request's ids: random version 4 UUIDs, never repeated, in a forked child neither."""

from __future__ import annotations

import os
import uuid

from llmsvc.gateway.ids import BLOCK, new_id


def test_ids_are_random_version_4_uuids_none_repeated_across_blocks() -> None:
    ids = [new_id() for _ in range(3 * BLOCK // 16 + 5)]  # past three reads of randomness
    assert len(set(ids)) == len(ids)
    assert {(i.version, i.variant) for i in ids} == {(4, uuid.RFC_4122)}
    assert len({i.int >> 96 for i in ids}) > len(ids) // 2  # not one counter's neighbours


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
