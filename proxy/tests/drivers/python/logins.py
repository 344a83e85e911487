"""psycopg 3 logging in once as each of many roles: `logins.py ROLE_PREFIX PASSWORD_PREFIX N`
logs in as ROLE_PREFIX{i} with PASSWORD_PREFIX{i} for i in 0..N and checks current_user.

Host, port and database come from PGHOST, PGPORT, PGDATABASE; with DRIVER_TLS_CA it verifies
the server's certificate and host name against it (sslmode=verify-full). Run by
proxy/tests/it/passthrough.rs. Prints `OK psycopg-logins <n> operations` and exits 0, or prints
the error and exits 1.
"""

import os
import sys

import psycopg


def main():
    role, password, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tls = {}
    if os.environ.get("DRIVER_TLS_CA"):
        tls = {"sslmode": "verify-full", "sslrootcert": os.environ["DRIVER_TLS_CA"]}
    for i in range(n):
        with psycopg.connect(
            host=os.environ.get("PGHOST", "127.0.0.1"),
            port=os.environ.get("PGPORT", "5432"),
            dbname=os.environ.get("PGDATABASE"),
            user=f"{role}{i}",
            password=f"{password}{i}",
            connect_timeout=30,
            **tls,
        ) as conn:
            got = conn.execute("SELECT current_user").fetchone()[0]
            if got != f"{role}{i}":
                raise SystemExit(f"logged in as {role}{i}, current_user is {got}")
    print(f"OK psycopg-logins {n} operations")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 - any failure is the test's
        print(f"FAILED: {e!r}")
        sys.exit(1)
