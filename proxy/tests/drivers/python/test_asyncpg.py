"""asyncpg through Sluice: asyncpg prepares every query as a named statement; explicit
`conn.prepare()` statements are re-executed many times, from more concurrent connections than the
pool has server connections, so statements hop between server connections.

Connection settings come from PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE. With DRIVER_TLS_CA
(a PEM CA bundle) it connects with TLS, verifying the server's certificate and host name against it
(an ssl.SSLContext); without it, in plaintext (ssl=False).
Run by proxy/tests/it/drivers.rs with the venv .ci/run creates (target/driver-venv).
Prints `OK asyncpg <n> operations` and exits 0, or prints the error and exits 1.
"""

import asyncio
import datetime as dt
import os
import ssl
import sys
import traceback
from decimal import Decimal

import asyncpg

WORKERS = int(os.environ.get("DRIVER_WORKERS", "10"))
ITERATIONS = int(os.environ.get("DRIVER_ITERATIONS", "50"))
TABLE = "drv_asyncpg"
DEADLINE_S = 90

operations = 0


def eq(actual, expected, what):
    if actual != expected:
        raise AssertionError(f"{what}: got {actual!r}, expected {expected!r}")


TLS_CA = os.environ.get("DRIVER_TLS_CA")


def tls():
    if not TLS_CA:
        return False
    # CERT_REQUIRED and check_hostname (IP addresses match IP SANs).
    return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=TLS_CA)


async def connect():
    return await asyncpg.connect(
        host=os.environ.get("PGHOST", "127.0.0.1"),
        port=int(os.environ.get("PGPORT", "5432")),
        user=os.environ.get("PGUSER"),
        password=os.environ.get("PGPASSWORD"),
        database=os.environ.get("PGDATABASE"),
        server_settings={"application_name": "sluice-driver-asyncpg"},
        timeout=30,
        ssl=tls(),
    )


async def setup():
    global operations
    conn = await connect()
    try:
        await conn.execute(
            f"""CREATE TABLE IF NOT EXISTS {TABLE} (
                id bigserial PRIMARY KEY,
                worker int NOT NULL,
                i int NOT NULL,
                txt text,
                data bytea,
                ts timestamptz,
                num numeric,
                note text)"""
        )
        await conn.execute(f"DELETE FROM {TABLE}")
        operations += 2
    finally:
        await conn.close()


async def worker(w):
    global operations
    conn = await connect()
    committed = 0
    try:
        echo = await conn.prepare(
            "SELECT $1::int4 AS i, $2::text AS t, $3::bytea AS b, $4::text AS n,"
            " $5::timestamptz AS ts, $6::numeric AS num, $7::int8 AS big"
        )
        insert = await conn.prepare(
            f"INSERT INTO {TABLE} (worker, i, txt, data, ts, num, note)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id"
        )
        get_row = await conn.prepare(
            f"SELECT worker, i, txt, data, ts, num, note FROM {TABLE} WHERE id = $1"
        )
        count = await conn.prepare(f"SELECT count(*)::int FROM {TABLE} WHERE worker = $1")
        series = await conn.prepare(
            "SELECT sum(g)::int8 AS s, count(*)::int AS c FROM generate_series(1, $1::int) AS g"
        )
        divide = await conn.prepare("SELECT 10 / $1::int")
        operations += 6

        for i in range(ITERATIONS):
            # 1. Every parameter type, re-executing the same prepared statement.
            data = bytes([0, 1, 2, 0xFE, 0xFF, w & 0xFF, i & 0xFF, 0x5C, 0x27])
            ts = dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone.utc) + dt.timedelta(
                seconds=w * 1000 + i
            )
            text = f"w{w}-i{i}-ünïcødé-'quote'"
            num = Decimal(f"{w * 1000 + i}.125")
            big = 2**40 + w * 1000 + i
            row = await echo.fetchrow(w * 1000 + i, text, data, None, ts, num, big)
            eq(tuple(row), (w * 1000 + i, text, data, None, ts, num, big), "echo row")
            eq(row["big"], big, "echo by name")
            operations += 1

            # 2. An explicit transaction: insert, read back, count, commit.
            note = None if i % 3 == 0 else "note"
            async with conn.transaction():
                rid = await insert.fetchval(w, i, text, data, ts, num, note)
                row = await get_row.fetchrow(rid)
                eq(tuple(row), (w, i, text, data, ts, num, note), "inserted row")
                eq(await count.fetchval(w), committed + 1, "count inside transaction")
                operations += 5
            committed += 1

            # 3. Rolled back (transaction object used by hand), the row is gone afterwards.
            if i % 5 == 0:
                tr = conn.transaction()
                await tr.start()
                gone = await insert.fetchval(w, -i, "rolled back", data, ts, Decimal(0), None)
                eq(await count.fetchval(w), committed + 1, "count before rollback")
                await tr.rollback()
                eq(await get_row.fetch(gone), [], "rolled back row")
                operations += 5

            # 4. An error inside a transaction; the statements still work afterwards.
            if i % 10 == 3:
                try:
                    async with conn.transaction():
                        eq(await divide.fetchval(5), 2, "10 / 5")
                        await divide.fetchval(0)
                    raise AssertionError("division by zero did not fail")
                except asyncpg.exceptions.DivisionByZeroError:
                    pass
                operations += 4

            # 5. Batch insert (executemany) in a transaction, checked and removed again.
            if i % 10 == 7:
                async with conn.transaction():
                    await insert.executemany(
                        [(w, 10000 + k, f"batch{k}", data, ts, Decimal(k), None) for k in range(5)]
                    )
                    got = await conn.fetchval(
                        f"SELECT count(*)::int FROM {TABLE} WHERE worker = $1 AND i >= 10000", w
                    )
                    eq(got, 5, "batch rows")
                    status = await conn.execute(
                        f"DELETE FROM {TABLE} WHERE worker = $1 AND i >= 10000", w
                    )
                    eq(status, "DELETE 5", "deleted batch rows")
                    operations += 5

            # 6. A mix of other statements: prepared objects and asyncpg's own statement cache.
            n = 1 + (w + i) % 20
            row = await series.fetchrow(n)
            eq((row["s"], row["c"]), (n * (n + 1) // 2, n), "sum of series")
            rows = await conn.fetch(
                "SELECT g, repeat($1::text, g) AS r FROM generate_series(1, $2::int) AS g ORDER BY g",
                "ab",
                3,
            )
            eq([tuple(r) for r in rows], [(1, "ab"), (2, "abab"), (3, "ababab")], "rows")
            eq(await conn.fetchval("SELECT $1::text || $2::text", f"u{w}", f"-{i}"), f"u{w}-{i}", "concat")
            eq(await count.fetchval(w), committed, "count after iteration")
            operations += 4
    finally:
        await conn.close()
    return committed


async def main():
    await setup()
    results = await asyncio.gather(*(worker(w) for w in range(WORKERS)))
    conn = await connect()
    try:
        total = await conn.fetchval(f"SELECT count(*)::int FROM {TABLE}")
    finally:
        await conn.close()
    eq(total, sum(results), "total rows")
    eq(total, WORKERS * ITERATIONS, "total rows")
    print(f"OK asyncpg {operations + 1} operations", flush=True)


if __name__ == "__main__":
    try:
        asyncio.run(asyncio.wait_for(main(), DEADLINE_S))
    except Exception:
        print("FAIL asyncpg:\n" + traceback.format_exc(), flush=True)
        sys.exit(1)
    sys.exit(0)
