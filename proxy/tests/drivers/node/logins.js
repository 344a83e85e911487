// node-postgres logging in once as each of many roles: `node logins.js ROLE_PREFIX
// PASSWORD_PREFIX N` logs in as ROLE_PREFIX{i} with PASSWORD_PREFIX{i} for i in 0..N and checks
// current_user.
//
// Host, port and database come from PGHOST, PGPORT, PGDATABASE; with DRIVER_TLS_CA it verifies
// the server's certificate against it. Run by proxy/tests/it/passthrough.rs. Prints
// `OK node-logins <n> operations` and exits 0, or prints the error and exits 1.
'use strict';

const fs = require('fs');
const { Client } = require('pg');

async function main() {
  const [role, password, count] = process.argv.slice(2);
  const n = Number(count);
  const ca = process.env.DRIVER_TLS_CA;
  const ssl = ca ? { ssl: { ca: fs.readFileSync(ca, 'utf8'), rejectUnauthorized: true } } : {};
  for (let i = 0; i < n; i++) {
    const client = new Client({
      host: process.env.PGHOST || '127.0.0.1',
      port: Number(process.env.PGPORT || 5432),
      database: process.env.PGDATABASE,
      user: `${role}${i}`,
      password: `${password}${i}`,
      connectionTimeoutMillis: 30000,
      ...ssl,
    });
    await client.connect();
    const res = await client.query('SELECT current_user AS u');
    await client.end();
    if (res.rows[0].u !== `${role}${i}`) {
      throw new Error(`logged in as ${role}${i}, current_user is ${res.rows[0].u}`);
    }
  }
  console.log(`OK node-logins ${n} operations`);
}

main().catch((e) => {
  console.log(`FAILED: ${e.stack || e}`);
  process.exit(1);
});
