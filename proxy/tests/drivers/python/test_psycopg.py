"""psycopg 3 through Sluice: every query server-side prepared (prepare_threshold=0), from more
concurrent connections than the pool has server connections, so statements hop between server
connections.

Connection settings come from PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE. With DRIVER_TLS_CA
(a PEM CA bundle) it connects with TLS, verifying the server's certificate and host name against it
(sslmode=verify-full, sslrootcert); without it, as before, the libpq environment decides.
Run by proxy/tests/it/drivers.rs with the venv .ci/run creates (target/driver-venv).
Prints `OK psycopg <n> operations` and exits 0, or prints the error and exits 1.
"""

import datetime as dt
import os
import sys
import threading
import traceback
from decimal import Decimal

import psycopg
from psycopg import errors

WORKERS = int(os.environ.get("DRIVER_WORKERS", "10"))
ITERATIONS = int(os.environ.get("DRIVER_ITERATIONS", "50"))
TABLE = "drv_psycopg"
DEADLINE_S = 90

_lock = threading.Lock()
_operations = 0


def count(n=1):
    global _operations
    with _lock:
        _operations += n


TLS_CA = os.environ.get("DRIVER_TLS_CA")


def connect(**kw):
    if TLS_CA:
        kw.update(sslmode="verify-full", sslrootcert=TLS_CA)
    return psycopg.connect(
        host=os.environ.get("PGHOST", "127.0.0.1"),
        port=os.environ.get("PGPORT", "5432"),
        user=os.environ.get("PGUSER"),
        password=os.environ.get("PGPASSWORD"),
        dbname=os.environ.get("PGDATABASE"),
        application_name="sluice-driver-psycopg",
        connect_timeout=30,
        prepare_threshold=0,  # prepare every statement, at its first execution
        **kw,
    )


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def eq(actual, expected, what):
    if actual != expected:
        raise AssertionError(f"{what}: got {actual!r}, expected {expected!r}")


def setup():
    with connect(autocommit=True) as conn:
        conn.execute(
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
        conn.execute(f"DELETE FROM {TABLE}")
        count(2)


ECHO = (
    "SELECT %s::int4 AS i, %s::text AS t, %s::bytea AS b, %s::text AS n,"
    " %s::timestamptz AS ts, %s::numeric AS num, %s::int8 AS big"
)
INSERT = (
    f"INSERT INTO {TABLE} (worker, i, txt, data, ts, num, note)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id"
)
GET_ROW = f"SELECT worker, i, txt, data, ts, num, note FROM {TABLE} WHERE id = %s"
COUNT = f"SELECT count(*)::int FROM {TABLE} WHERE worker = %s"
SERIES = "SELECT sum(g)::int8, count(*)::int FROM generate_series(1, %s::int) AS g"
ROWS = "SELECT g, repeat(%s::text, g) FROM generate_series(1, %s::int) AS g ORDER BY g"
DIVIDE = "SELECT 10 / %s::int"


def worker(w):
    committed = 0
    with connect(autocommit=True) as conn:
        cur = conn.cursor()
        bcur = conn.cursor(binary=True)  # results in binary format
        for i in range(ITERATIONS):
            # 1. Every parameter type, re-executing the same prepared statement, text and binary.
            data = bytes([0, 1, 2, 0xFE, 0xFF, w & 0xFF, i & 0xFF, 0x5C, 0x27])
            ts = dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone.utc) + dt.timedelta(
                seconds=w * 1000 + i
            )
            text = f"w{w}-i{i}-ünïcødé-'quote'"
            num = Decimal(f"{w * 1000 + i}.125")
            big = 2**40 + w * 1000 + i
            params = (w * 1000 + i, text, data, None, ts, num, big)
            for c in (cur, bcur):
                c.execute(ECHO, params, prepare=True)
                count()
                eq(c.rowcount, 1, "echo rowcount")
                row = c.fetchone()
                eq(row, (w * 1000 + i, text, data, None, ts, num, big), "echo row")

            # 2. An explicit transaction (psycopg's transaction block): insert, read, count.
            note = None if i % 3 == 0 else "note"
            with conn.transaction():
                cur.execute(INSERT, (w, i, text, data, ts, num, note), prepare=True)
                (rid,) = cur.fetchone()
                cur.execute(GET_ROW, (rid,))
                eq(cur.fetchone(), (w, i, text, data, ts, num, note), "inserted row")
                cur.execute(COUNT, (w,))
                eq(cur.fetchone()[0], committed + 1, "count inside transaction")
                count(3)
            committed += 1

            # 3. Rolled back, with explicit BEGIN / ROLLBACK statements.
            if i % 5 == 0:
                cur.execute("BEGIN")
                cur.execute(INSERT, (w, -i, "rolled back", data, ts, Decimal(0), None))
                (gone,) = cur.fetchone()
                cur.execute(COUNT, (w,))
                eq(cur.fetchone()[0], committed + 1, "count before rollback")
                cur.execute("ROLLBACK")
                cur.execute(GET_ROW, (gone,))
                eq(cur.fetchall(), [], "rolled back row")
                count(5)

            # 4. An error inside a transaction; the statements still work afterwards.
            if i % 10 == 3:
                try:
                    with conn.transaction():
                        cur.execute(DIVIDE, (5,))
                        eq(cur.fetchone()[0], 2, "10 / 5")
                        cur.execute(DIVIDE, (0,))
                    raise AssertionError("division by zero did not fail")
                except errors.DivisionByZero:
                    pass
                count(2)

            # 5. Batch insert (executemany; pipelined by psycopg) in a transaction.
            if i % 10 == 7:
                with conn.transaction():
                    cur.executemany(
                        INSERT,
                        [(w, 10000 + k, f"batch{k}", data, ts, Decimal(k), None) for k in range(5)],
                    )
                    cur.execute(f"SELECT count(*)::int FROM {TABLE} WHERE worker = %s AND i >= 10000", (w,))
                    got = cur.fetchone()[0]
                    count(6)
                    # Leave the count of the main rows alone: delete them again.
                    cur.execute(f"DELETE FROM {TABLE} WHERE worker = %s AND i >= 10000", (w,))
                    eq(cur.rowcount, 5, "deleted batch rows")
                    eq(got, 5, "batch rows")
                    count()

            # 6. A mix of other statements.
            n = 1 + (w + i) % 20
            cur.execute(SERIES, (n,))
            eq(cur.fetchone(), (n * (n + 1) // 2, n), "sum of series")
            bcur.execute(ROWS, ("ab", 3))
            eq(bcur.fetchall(), [(1, "ab"), (2, "abab"), (3, "ababab")], "rows")
            cur.execute("SELECT %s::text || %s::text", (f"u{w}", f"-{i}"), prepare=False)
            eq(cur.fetchone()[0], f"u{w}-{i}", "unprepared concat")
            cur.execute(COUNT, (w,))
            eq(cur.fetchone()[0], committed, "count after iteration")
            count(4)
    return committed


def main():
    timer = threading.Timer(DEADLINE_S, lambda: (print(f"FAIL psycopg: not done after {DEADLINE_S} s", flush=True), os._exit(1)))
    timer.daemon = True
    timer.start()

    setup()
    results = [None] * WORKERS
    failures = []

    def run(w):
        try:
            results[w] = worker(w)
        except BaseException:
            failures.append(f"worker {w}:\n{traceback.format_exc()}")

    threads = [threading.Thread(target=run, args=(w,)) for w in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        print("FAIL psycopg:\n" + "\n".join(failures), flush=True)
        sys.exit(1)

    with connect(autocommit=True) as conn:
        total = conn.execute(f"SELECT count(*)::int FROM {TABLE}").fetchone()[0]
        count()
    eq(total, sum(results), "total rows")
    eq(total, WORKERS * ITERATIONS, "total rows")
    print(f"OK psycopg {_operations} operations", flush=True)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        print("FAIL psycopg:\n" + traceback.format_exc(), flush=True)
        sys.exit(1)
    sys.exit(0)
