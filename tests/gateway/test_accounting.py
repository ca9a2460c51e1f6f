"""An attempt's journaled texts as accounting keeps them for counting at its end."""

from __future__ import annotations

import sys

from llmsvc.gateway.accounting import JOIN_EVERY, Pieces
from llmsvc.tokens import count_completion


def texts_of(pieces: Pieces) -> str:
    return "".join(t for texts in pieces for t in texts)


def test_pieces_keep_every_text_in_order_however_they_are_joined() -> None:
    pieces, sent = Pieces(), []
    assert not pieces
    for i in range(5 * JOIN_EVERY + 3):
        batch = [f"t{i}.{j} " for j in range(i % 3 + 1)]
        pieces.add(batch)
        sent += batch
    assert pieces
    assert texts_of(pieces) == "".join(sent)
    text = "".join(sent)
    assert count_completion("gpt-4o-mini", pieces, 0) == count_completion(
        "gpt-4o-mini", [[text]], 0
    )


def test_the_last_batch_is_dropped_whole_and_only_it() -> None:
    pieces = Pieces()
    for i in range(JOIN_EVERY * 2):
        pieces.add([f"{i},"])
    pieces.add(["refused ", "batch"])
    pieces.drop_last()
    assert texts_of(pieces) == "".join(f"{i}," for i in range(JOIN_EVERY * 2))
    pieces.drop_last()  # once only: nothing more goes
    assert texts_of(pieces).endswith(f"{JOIN_EVERY * 2 - 1},")


def test_texts_joined_to_the_last_batch_are_dropped_with_it() -> None:
    """A stream's read journaled into the held batch's WAL write is refused with it."""
    pieces = Pieces()
    for i in range(JOIN_EVERY):
        pieces.add([f"{i},"])
    pieces.add(["held "])
    pieces.join_last(["joined ", "read"])
    pieces.drop_last()
    assert texts_of(pieces) == "".join(f"{i}," for i in range(JOIN_EVERY))


def test_a_long_reply_costs_about_its_characters() -> None:
    """A token a batch, as a paced stream journals them: ~150 bytes a token kept as they
    came, about the text's own size here."""
    pieces = Pieces()
    for _ in range(1000):
        pieces.add([" word"])
    kept = next(iter(pieces))
    size = sys.getsizeof(kept) + sum(sys.getsizeof(t) for t in kept)
    assert size < 5 * 1000 * 2
