"""An attempt's journaled texts as accounting keeps them for counting at its end."""

from __future__ import annotations

import sys

from llmsvc.gateway.accounting import Pieces
from llmsvc.tokens import count_completion


def texts_of(pieces: Pieces) -> str:
    return "".join(t for texts in pieces for t in texts)


def test_pieces_keep_every_text_in_order() -> None:
    pieces, sent = Pieces(), []
    assert not pieces
    for i in range(80):
        batch = [f"t{i}.{j} é😀 " for j in range(i % 3 + 1)]
        pieces.add(batch)
        sent += batch
    assert pieces
    assert texts_of(pieces) == "".join(sent)
    text = "".join(sent)
    assert count_completion("gpt-4o-mini", pieces, 0) == count_completion(
        "gpt-4o-mini", [[text]], 0
    )


def test_a_lone_surrogate_is_kept_as_it_came() -> None:
    pieces = Pieces()
    pieces.add(["a\ud800b"])
    assert texts_of(pieces) == "a\ud800b"


def test_the_last_batch_is_dropped_whole_and_only_it() -> None:
    pieces = Pieces()
    for i in range(32):
        pieces.add([f"{i},"])
    pieces.add(["refused ", "bätch"])
    pieces.drop_last()
    assert texts_of(pieces) == "".join(f"{i}," for i in range(32))
    pieces.drop_last()  # once only: nothing more goes
    assert texts_of(pieces).endswith("31,")


def test_a_refused_only_batch_leaves_nothing() -> None:
    pieces = Pieces()
    pieces.add(["refused"])
    pieces.drop_last()
    assert not pieces


def test_texts_joined_to_the_last_batch_are_dropped_with_it() -> None:
    """A stream's read journaled into the held batch's WAL write is refused with it."""
    pieces = Pieces()
    for i in range(16):
        pieces.add([f"{i},"])
    pieces.add(["held "])
    pieces.join_last(["joined ", "read"])
    pieces.drop_last()
    assert texts_of(pieces) == "".join(f"{i}," for i in range(16))


def test_a_long_reply_costs_about_its_characters() -> None:
    """A token a batch, as a paced stream journals them: ~60 bytes a token kept as they
    came, about the text's own size here."""
    pieces = Pieces()
    for _ in range(1000):
        pieces.add([" word"])
    assert sys.getsizeof(pieces._text) < 5 * 1000 * 1.3
