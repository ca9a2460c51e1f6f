"""The token rows' times on SQLite: the text SQLAlchemy itself would store for each."""

from __future__ import annotations

import random
from datetime import UTC, datetime

from sqlalchemy.dialects import sqlite

from llmsvc.store.batch import _sqlite_rows
from llmsvc.store.schema import Timestamp


def test_each_tokens_time_is_the_text_sqlalchemy_stores_for_it() -> None:
    dialect = sqlite.dialect()
    as_stored = Timestamp.dialect_impl(dialect).bind_processor(dialect)
    assert as_stored is not None
    us = 1_700_000_000_999_998
    tokens = [(bytes(16), seq, "t", us + seq) for seq in range(3)]  # .999998 to the next second
    rng = random.Random(7)
    for seq in range(3, 5_000):  # same read, next µs, across seconds, a paced gap, a long wait
        us += rng.choice([0, 1, 1, 999_999, 20_000, 3_600_000_000])
        tokens.append((bytes(16), seq, "t", us))

    rows = _sqlite_rows(tokens)

    expected = [as_stored(datetime.fromtimestamp(t[3] / 1e6, UTC)) for t in tokens]
    assert [row[3] for row in rows] == expected
    assert [row[3][-7:] for row in rows[:3]] == [".999998", ".999999", ".000000"]
