"""Which bulk insert the flusher should use for tokens on PostgreSQL, measured.

Compares one unnest() INSERT, COPY into a staging table + INSERT … SELECT, and
executemany, each idempotent (ON CONFLICT DO NOTHING), interleaved over rounds
on one connection; prints and writes JSON with medians in rows/s.

    python benchmarks/bench_pg_bulk.py --url postgresql://postgres@127.0.0.1/llmsvc_bench
"""

import argparse
import asyncio
import json
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

TABLE = """CREATE TABLE IF NOT EXISTS bench_token_log (attempt_id uuid, seq int4, text text,
    created_at timestamptz NOT NULL, PRIMARY KEY (attempt_id, seq))"""
STAMP = "timestamptz 'epoch' + u * interval '1 microsecond'"
UNNEST = f"""INSERT INTO bench_token_log SELECT a, s, t, {STAMP}
FROM unnest($1::uuid[], $2::int4[], $3::text[], $4::int8[]) AS x(a, s, t, u)
ON CONFLICT DO NOTHING"""
STAGE = """CREATE TEMP TABLE IF NOT EXISTS stage (a uuid, s int4, t text, u int8)
ON COMMIT DELETE ROWS"""
FROM_STAGE = (
    f"INSERT INTO bench_token_log SELECT a, s, t, {STAMP} FROM stage ON CONFLICT DO NOTHING"
)
MANY = f"""INSERT INTO bench_token_log VALUES ($1, $2, $3, {STAMP.replace("u *", "$4 *")})
ON CONFLICT DO NOTHING"""


async def insert(conn: Any, method: str, rows: list[tuple[Any, ...]]) -> None:
    async with conn.transaction():
        if method == "unnest":
            await conn.execute(UNNEST, *(list(col) for col in zip(*rows, strict=True)))
        elif method == "copy_staging":
            await conn.execute(STAGE)
            await conn.copy_records_to_table("stage", records=rows)
            await conn.execute(FROM_STAGE)
        else:
            await conn.executemany(MANY, rows)


async def main(url: str, rows_per_batch: int, rounds: int) -> dict[str, Any]:
    conn = await asyncpg.connect(url)
    await conn.execute(TABLE)
    rates: dict[str, list[float]] = {"unnest": [], "copy_staging": [], "executemany": []}
    for _ in range(rounds):
        for method, found in rates.items():
            await conn.execute("TRUNCATE bench_token_log")
            ids = [uuid.uuid4() for _ in range(rows_per_batch // 1000 + 1)]
            rows = [
                (ids[i // 1000], i, f"tok{i} ", 1_764_000_000_000_000 + i)
                for i in range(rows_per_batch)
            ]
            start = time.perf_counter()
            await insert(conn, method, rows)
            found.append(rows_per_batch / (time.perf_counter() - start))
    await conn.execute("DROP TABLE bench_token_log")
    await conn.close()
    result: dict[str, Any] = {m: round(statistics.median(v)) for m, v in rates.items()}
    result["copy_over_unnest"] = round(result["copy_staging"] / result["unnest"], 2)
    result["copy_over_executemany"] = round(result["copy_staging"] / result["executemany"], 2)
    result["rows_per_batch"], result["rounds"] = rows_per_batch, rounds
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench-pg-bulk.json"))
    args = parser.parse_args()
    figures = asyncio.run(main(args.url, args.rows, args.rounds))
    args.out.write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures))
