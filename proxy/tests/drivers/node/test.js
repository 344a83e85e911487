// node-postgres (pg) through Sluice: named prepared statements from more concurrent clients
// than the pool has server connections, so every statement hops between server connections.
//
// Connection settings come from PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE. With DRIVER_TLS_CA
// (a PEM CA bundle) it connects with TLS, verifying the server's certificate and host name against
// it (`ssl: { ca, rejectUnauthorized: true }`); without it, as before.
// Run by proxy/tests/it/drivers.rs (`node test.js` in this directory, after `npm ci`).
// Prints `OK node-postgres <n> operations` and exits 0, or prints the error and exits 1.
'use strict';

const assert = require('node:assert/strict');
const fs = require('node:fs');
const { Client } = require('pg');

const WORKERS = Number(process.env.DRIVER_WORKERS || 10);
const ITERATIONS = Number(process.env.DRIVER_ITERATIONS || 50);
const TABLE = 'drv_node';
const DEADLINE_MS = 90_000;

let operations = 0;

const TLS_CA = process.env.DRIVER_TLS_CA;

function settings() {
  const tls = TLS_CA ? { ssl: { ca: fs.readFileSync(TLS_CA, 'utf8'), rejectUnauthorized: true } } : {};
  return {
    ...tls,
    host: process.env.PGHOST || '127.0.0.1',
    port: Number(process.env.PGPORT || 5432),
    user: process.env.PGUSER,
    password: process.env.PGPASSWORD,
    database: process.env.PGDATABASE,
    application_name: 'sluice-driver-node',
    connectionTimeoutMillis: 30_000,
  };
}

async function q(client, query) {
  const res = await client.query(query);
  operations += 1;
  return res;
}

async function setup() {
  const client = new Client(settings());
  await client.connect();
  try {
    await q(client, `CREATE TABLE IF NOT EXISTS ${TABLE} (
        id bigserial PRIMARY KEY,
        worker int NOT NULL,
        i int NOT NULL,
        txt text,
        data bytea,
        ts timestamptz,
        num numeric,
        note text)`);
    await q(client, `DELETE FROM ${TABLE}`);
  } finally {
    await client.end();
  }
}

// Named statements (node-postgres parses each name once per connection, then only binds it).
const ECHO = {
  name: 'node-echo-types',
  text: 'SELECT $1::int4 AS i, $2::text AS t, $3::bytea AS b, $4::text AS n, $5::timestamptz AS ts, $6::numeric AS num, $7::int8 AS big',
};
const INSERT = {
  name: 'node-insert',
  text: `INSERT INTO ${TABLE} (worker, i, txt, data, ts, num, note) VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id`,
};
const GET_ROW = {
  name: 'node-get-row',
  text: `SELECT worker, i, txt, data, ts, num, note FROM ${TABLE} WHERE id = $1`,
};
const COUNT = {
  name: 'node-count-worker',
  text: `SELECT count(*)::int AS n FROM ${TABLE} WHERE worker = $1`,
};
const SERIES = {
  name: 'node-sum-series',
  text: 'SELECT sum(g)::int8 AS s, count(*)::int AS c FROM generate_series(1, $1::int) AS g',
};
const ROWS = {
  name: 'node-rows',
  text: 'SELECT g AS n, repeat($2::text, g) AS r FROM generate_series(1, $1::int) AS g ORDER BY g',
};
const DIVIDE = {
  name: 'node-divide',
  text: 'SELECT 10 / $1::int AS q',
};

function expectRowValues(row, w, i, txt, data, ts, num, note) {
  assert.equal(row.worker, w);
  assert.equal(row.i, i);
  assert.equal(row.txt, txt);
  assert.ok(Buffer.isBuffer(row.data), 'bytea must come back as a Buffer');
  assert.ok(row.data.equals(data), `bytea mismatch: ${row.data.toString('hex')} != ${data.toString('hex')}`);
  assert.equal(row.ts.getTime(), ts.getTime());
  assert.equal(row.num, num);
  assert.equal(row.note, note);
}

async function worker(w) {
  const client = new Client(settings());
  await client.connect();
  let committed = 0;
  try {
    for (let i = 0; i < ITERATIONS; i++) {
      // 1. Every parameter type, re-executing the same named statement.
      const bytes = Buffer.from([0, 1, 2, 0xfe, 0xff, w & 0xff, i & 0xff, 0x5c, 0x27]);
      const ts = new Date(Date.UTC(2024, 0, 1, 12, 0, 0) + (w * 1000 + i) * 1000);
      const text = `w${w}-i${i}-ünïcødé-'quote'`;
      const num = `${w * 1000 + i}.125`;
      const big = (2n ** 40n + BigInt(w * 1000 + i)).toString();
      let res = await q(client, { ...ECHO, values: [w * 1000 + i, text, bytes, null, ts, num, big] });
      assert.equal(res.rowCount, 1);
      const e = res.rows[0];
      assert.equal(e.i, w * 1000 + i);
      assert.equal(e.t, text);
      assert.ok(e.b.equals(bytes));
      assert.equal(e.n, null);
      assert.equal(e.ts.getTime(), ts.getTime());
      assert.equal(e.num, num);
      assert.equal(e.big, big);

      // 2. An explicit transaction: insert, read back, count, commit.
      await q(client, 'BEGIN');
      res = await q(client, { ...INSERT, values: [w, i, text, bytes, ts, num, i % 3 === 0 ? null : 'note'] });
      assert.equal(res.rowCount, 1);
      const id = res.rows[0].id;
      res = await q(client, { ...GET_ROW, values: [id] });
      assert.equal(res.rowCount, 1);
      expectRowValues(res.rows[0], w, i, text, bytes, ts, num, i % 3 === 0 ? null : 'note');
      res = await q(client, { ...COUNT, values: [w] });
      assert.equal(res.rows[0].n, committed + 1);
      await q(client, 'COMMIT');
      committed += 1;

      // 3. Rolled back: the row must be gone afterwards.
      if (i % 5 === 0) {
        await q(client, 'BEGIN');
        res = await q(client, { ...INSERT, values: [w, -i, 'rolled back', bytes, ts, '0', null] });
        const gone = res.rows[0].id;
        res = await q(client, { ...COUNT, values: [w] });
        assert.equal(res.rows[0].n, committed + 1);
        await q(client, 'ROLLBACK');
        res = await q(client, { ...GET_ROW, values: [gone] });
        assert.equal(res.rowCount, 0);
      }

      // 4. An error inside a transaction, then ROLLBACK; the statements still work afterwards.
      if (i % 10 === 3) {
        await q(client, 'BEGIN');
        res = await q(client, { ...DIVIDE, values: [5] });
        assert.equal(res.rows[0].q, 2);
        await assert.rejects(q(client, { ...DIVIDE, values: [0] }), (err) => err.code === '22012');
        await q(client, 'ROLLBACK');
      }

      // 5. A mix of other statements, named and unnamed.
      const n = 1 + ((w + i) % 20);
      res = await q(client, { ...SERIES, values: [n] });
      assert.equal(res.rows[0].s, String((n * (n + 1)) / 2));
      assert.equal(res.rows[0].c, n);
      res = await q(client, { ...ROWS, values: [3, 'ab'] });
      assert.deepEqual(res.rows.map((r) => [r.n, r.r]), [[1, 'ab'], [2, 'abab'], [3, 'ababab']]);
      res = await q(client, { text: 'SELECT $1::text || $2::text AS s', values: [`u${w}`, `-${i}`] });
      assert.equal(res.rows[0].s, `u${w}-${i}`);
      res = await q(client, { ...COUNT, values: [w] });
      assert.equal(res.rows[0].n, committed);
    }
  } finally {
    await client.end();
  }
  return committed;
}

async function main() {
  const watchdog = setTimeout(() => {
    console.error(`FAIL node-postgres: not done after ${DEADLINE_MS} ms`);
    process.exit(1);
  }, DEADLINE_MS);
  watchdog.unref();

  await setup();
  const done = await Promise.all(Array.from({ length: WORKERS }, (_, w) => worker(w)));
  const client = new Client(settings());
  await client.connect();
  try {
    const res = await q(client, { name: 'node-total', text: `SELECT count(*)::int AS n FROM ${TABLE}` });
    assert.equal(res.rows[0].n, done.reduce((a, b) => a + b, 0));
    assert.equal(res.rows[0].n, WORKERS * ITERATIONS);
  } finally {
    await client.end();
  }
  console.log(`OK node-postgres ${operations} operations`);
}

main().then(
  () => process.exit(0),
  (err) => {
    console.error('FAIL node-postgres:', err && err.stack ? err.stack : err);
    if (err && err.code) console.error('SQLSTATE', err.code);
    process.exit(1);
  },
);
