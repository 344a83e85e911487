//! What the client does in each scenario. Messages are built with postgres-protocol's frontend
//! builders; each step asserts the tags of what came back, so a capture that went differently
//! than described fails instead of becoming a fixture.

use bytes::{BufMut, BytesMut};
use postgres_protocol::message::frontend;
use postgres_protocol::IsNull;

use super::recorder::Tap;
use crate::support::raw::{fields, tags, Msg, Raw};

/// A raw client that collects messages into one write.
pub struct Client {
    raw: Raw,
    out: BytesMut,
    tap: Tap,
}

/// Text OIDs of the parameter types used.
const INT4: u32 = 23;
const TEXT: u32 = 25;

impl Client {
    pub fn new(raw: Raw, tap: Tap) -> Client {
        Client {
            raw,
            out: BytesMut::new(),
            tap,
        }
    }

    fn parse(&mut self, name: &str, sql: &str, types: &[u32]) -> &mut Self {
        frontend::parse(name, sql, types.iter().copied(), &mut self.out).unwrap();
        self
    }

    /// Bind with text parameters and text results.
    fn bind(&mut self, portal: &str, statement: &str, params: &[&str]) -> &mut Self {
        frontend::bind(
            portal,
            statement,
            std::iter::empty::<i16>(),
            params.iter(),
            |v, buf| {
                buf.put_slice(v.as_bytes());
                Ok(IsNull::No)
            },
            std::iter::empty::<i16>(),
            &mut self.out,
        )
        .map_err(|_| "bind")
        .unwrap();
        self
    }

    fn describe(&mut self, kind: u8, name: &str) -> &mut Self {
        frontend::describe(kind, name, &mut self.out).unwrap();
        self
    }

    fn execute(&mut self, portal: &str, max_rows: i32) -> &mut Self {
        frontend::execute(portal, max_rows, &mut self.out).unwrap();
        self
    }

    fn close(&mut self, kind: u8, name: &str) -> &mut Self {
        frontend::close(kind, name, &mut self.out).unwrap();
        self
    }

    fn sync(&mut self) -> &mut Self {
        frontend::sync(&mut self.out);
        self
    }

    fn flush(&mut self) -> &mut Self {
        frontend::flush(&mut self.out);
        self
    }

    fn query(&mut self, sql: &str) -> &mut Self {
        frontend::query(sql, &mut self.out).unwrap();
        self
    }

    fn copy_data(&mut self, data: &[u8]) -> &mut Self {
        frontend::CopyData::new(data).unwrap().write(&mut self.out);
        self
    }

    fn copy_done(&mut self) -> &mut Self {
        frontend::copy_done(&mut self.out);
        self
    }

    fn copy_fail(&mut self, why: &str) -> &mut Self {
        frontend::copy_fail(why, &mut self.out).unwrap();
        self
    }

    /// Sends what was collected as one write.
    async fn send(&mut self) {
        let out = self.out.split();
        self.raw.send(&out).await;
    }

    /// Sends what was collected and waits until the relays have passed it on and everything
    /// it caused: for writes that get no answer, so that the next write is a chunk of its own.
    async fn send_alone(&mut self) {
        self.send().await;
        self.tap.settle().await;
    }

    /// Reads as many messages as `want` has tags, and checks their tags.
    async fn expect(&mut self, want: &str) -> Vec<Msg> {
        let mut got = Vec::new();
        for _ in want.chars() {
            got.push(self.raw.recv().await);
        }
        let seen = tags(&got);
        assert_eq!(seen, want, "{}", explain(&got));
        got
    }

    /// Sends what was collected and expects `want`.
    async fn round(&mut self, want: &str) -> Vec<Msg> {
        self.send().await;
        self.expect(want).await
    }

    /// A simple Query on its own.
    async fn simple(&mut self, sql: &str, want: &str) -> Vec<Msg> {
        self.query(sql);
        self.round(want).await
    }

    /// Says goodbye (a write of its own) and closes the connection.
    pub async fn terminate(mut self) {
        frontend::terminate(&mut self.out);
        self.send().await;
        drop(self.raw);
    }
}

/// Tags with the messages of errors and notices, for failed assertions.
fn explain(msgs: &[Msg]) -> String {
    msgs.iter()
        .map(|(tag, body)| match tag {
            b'E' | b'N' => format!(
                "{}({})",
                *tag as char,
                fields(body).get(&'M').cloned().unwrap_or_default()
            ),
            t => (*t as char).to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The transaction status of the ReadyForQuery that ends `msgs`.
fn status(msgs: &[Msg]) -> u8 {
    let (tag, body) = msgs.last().expect("a message");
    assert_eq!(*tag, b'Z');
    body[0]
}

/// Runs scenario `name`.
pub async fn run(name: &str, c: &mut Client) {
    match name {
        "simple_query" => simple_query(c).await,
        "extended_pipelined" => extended_pipelined(c).await,
        "error_mid_batch" => error_mid_batch(c).await,
        "copy" => copy(c).await,
        "portal_suspended" => portal_suspended(c).await,
        "flush" => flush(c).await,
        "evicted_reprepared" => evicted_reprepared(c).await,
        "deallocate_discard" => deallocate_discard(c).await,
        "session_state_reject" => session_state_reject(c).await,
        "session_state_pin" => session_state_pin(c).await,
        "session_pooling" => session_pooling(c).await,
        "large_message" => large_message(c).await,
        other => panic!("no scenario {other}"),
    }
}

async fn simple_query(c: &mut Client) {
    c.simple("SELECT 1 AS one", "TDCZ").await;
    c.simple(
        "SELECT 'a' AS x; SELECT 2 AS y, 3 AS z; VALUES (4), (5)",
        "TDCTDCTDDCZ",
    )
    .await;
    // An error in the middle of a multi-statement Query ends its implicit transaction.
    c.simple("SELECT 1 AS before; SELECT 1/0; SELECT 3 AS never", "TDCEZ")
        .await;
    // A transaction block over several Queries.
    assert_eq!(status(&c.simple("BEGIN", "CZ").await), b'T');
    c.simple("INSERT INTO items VALUES (1, 'one'), (2, 'two')", "CZ")
        .await;
    c.simple("UPDATE items SET name = upper(name) WHERE id = 2", "CZ")
        .await;
    c.simple("SELECT count(*) AS n FROM items", "TDCZ").await;
    assert_eq!(status(&c.simple("COMMIT", "CZ").await), b'I');
    // An error inside a block: the block is failed until ROLLBACK.
    c.simple("BEGIN", "CZ").await;
    assert_eq!(status(&c.simple("SELECT 1/0", "EZ").await), b'E');
    assert_eq!(status(&c.simple("SELECT 1", "EZ").await), b'E');
    assert_eq!(status(&c.simple("ROLLBACK", "CZ").await), b'I');
    // An empty query, and a notice.
    c.simple("", "IZ").await;
    c.simple(
        "DO $$ BEGIN RAISE NOTICE 'hello from a notice'; END $$",
        "NCZ",
    )
    .await;
}

async fn extended_pipelined(c: &mut Client) {
    // Three unnamed batches in one write.
    for v in ["21", "22", "23"] {
        c.parse("", "SELECT $1::int4 * 2 AS doubled", &[INT4])
            .bind("", "", &[v])
            .describe(b'P', "")
            .execute("", 0)
            .sync();
    }
    c.round("12TDCZ12TDCZ12TDCZ").await;
    // A named statement: Sluice prepares it under its own name.
    c.parse("s1", "SELECT $1::text || '!' AS shout", &[TEXT])
        .bind("", "s1", &["hi"])
        .execute("", 0)
        .sync();
    c.round("12DCZ").await;
    // Used in a later batch (and transaction): renamed.
    c.bind("", "s1", &["again"]).execute("", 0).sync();
    c.round("2DCZ").await;
    // Parsed again without a Close: refused as PostgreSQL refuses it (42P05), and the rest of
    // the batch skipped.
    c.parse("s1", "SELECT $1::text || '?' AS ask", &[TEXT])
        .bind("", "s1", &["skipped"])
        .execute("", 0)
        .sync();
    c.round("EZ").await;
    // Closed, then parsed again with the same text: the server still has it, so Sluice answers
    // both the Close and the Parse itself.
    c.close(b'S', "s1")
        .parse("s1", "SELECT $1::text || '!' AS shout", &[TEXT])
        .bind("", "s1", &["third"])
        .execute("", 0)
        .sync();
    c.round("312DCZ").await;
    // Named statements pipelined: three batches in one write, a named portal.
    c.parse("s2", "SELECT $1::int4 + $2::int4 AS total", &[INT4, INT4])
        .bind("", "s2", &["1", "2"])
        .execute("", 0)
        .sync()
        .bind("p", "s2", &["3", "4"])
        .describe(b'P', "p")
        .execute("p", 0)
        .sync()
        .bind("", "s1", &["four"])
        .execute("", 0)
        .sync();
    c.round("12DCZ2TDCZ2DCZ").await;
    c.describe(b'S', "s1").sync();
    c.round("tTZ").await;
    // Close: the client forgets s1 (the server keeps it), Sluice answers CloseComplete.
    c.close(b'S', "s1").sync();
    c.round("3Z").await;
    // A name the client closed goes to the server as it is, which does not know it.
    c.bind("", "s1", &["gone"]).execute("", 0).sync();
    c.round("EZ").await;
}

async fn error_mid_batch(c: &mut Client) {
    // A good statement, a syntax error, then more messages: the server skips to the Sync.
    c.parse("", "SELECT 1 AS a", &[])
        .bind("", "", &[])
        .execute("", 0)
        .parse("", "SELEC 2", &[])
        .bind("", "", &[])
        .execute("", 0)
        .parse("", "SELECT 3 AS c", &[])
        .bind("", "", &[])
        .describe(b'P', "")
        .execute("", 0)
        .sync();
    c.round("12DCEZ").await;
    // An error at Execute, with the next batch in the same write.
    c.parse(
        "",
        "SELECT 1 / (g - 1) AS boom FROM generate_series(1, 2) g",
        &[],
    )
    .bind("", "", &[])
    .execute("", 0)
    .sync()
    .parse("", "SELECT 'after' AS next", &[])
    .bind("", "", &[])
    .execute("", 0)
    .sync();
    c.round("12EZ12DCZ").await;
    // A named Parse the server refuses: Sluice forgets it, so its reuse goes to the server
    // under the client's name (which the server does not know either).
    c.parse("bad", "SELECT * FROM no_such_table", &[])
        .bind("", "bad", &[])
        .execute("", 0)
        .sync();
    c.round("EZ").await;
    c.bind("", "bad", &[]).execute("", 0).sync();
    c.round("EZ").await;
    // The name can be prepared again.
    c.parse("bad", "SELECT 4 AS b", &[])
        .bind("", "bad", &[])
        .execute("", 0)
        .sync();
    c.round("12DCZ").await;
    // A named Parse that succeeds before an error, and one skipped after it.
    c.parse("kept", "SELECT 5 AS kept", &[])
        .parse("", "SELEC 6", &[])
        .parse("skipped", "SELECT 7 AS skipped", &[])
        .sync();
    c.round("1EZ").await;
    c.bind("", "kept", &[]).execute("", 0).sync();
    c.round("2DCZ").await;
    c.bind("", "skipped", &[]).execute("", 0).sync();
    c.round("EZ").await;
    // An error at Bind of a named statement (wrong parameter count).
    c.bind("", "kept", &["extra"]).execute("", 0).sync();
    c.round("EZ").await;
}

async fn copy(c: &mut Client) {
    // COPY FROM STDIN by a simple Query, its data in three writes.
    c.simple("COPY copy_target FROM STDIN", "G").await;
    c.copy_data(b"1\tone\n").send_alone().await;
    c.copy_data(b"2\ttwo\n").send_alone().await;
    c.copy_data(b"3\tthree\n").copy_done();
    c.round("CZ").await;
    // By the extended protocol, with a Sync right after the Execute (which the server,
    // in COPY mode, ignores) and another after CopyDone, as pgjdbc does.
    c.parse("", "COPY copy_target FROM STDIN", &[])
        .bind("", "", &[])
        .execute("", 0)
        .sync();
    c.round("12G").await;
    c.copy_data(b"4\tfour\n")
        .copy_data(b"5\tfive\n")
        .send_alone()
        .await;
    c.copy_done().sync();
    c.round("CZ").await;
    // COPY TO STDOUT.
    c.simple(
        "COPY (SELECT id, name FROM copy_target ORDER BY id) TO STDOUT",
        "HdddddcCZ",
    )
    .await;
    // Ended by the client with CopyFail.
    c.simple("COPY copy_target FROM STDIN", "G").await;
    c.copy_data(b"9\tnine\n").send_alone().await;
    c.copy_fail("client gave up");
    c.round("EZ").await;
    // Ended by the server: a bad row fails the COPY at once; the client's CopyData and
    // CopyDone after that are dropped by the server, unanswered.
    c.simple("COPY copy_target FROM STDIN", "G").await;
    c.copy_data(b"not a number\tbad\n");
    c.round("EZ").await;
    c.copy_data(b"10\tten\n").copy_done().send_alone().await;
    let m = c
        .simple("SELECT count(*) AS n FROM copy_target", "TDCZ")
        .await;
    assert_eq!(crate::support::raw::row_text(&m[1].1), [Some("5".into())]);
}

async fn portal_suspended(c: &mut Client) {
    c.simple("BEGIN", "CZ").await;
    c.parse("", "SELECT g FROM generate_series(1, 7) g", &[])
        .bind("cur", "", &[])
        .execute("cur", 3)
        .sync();
    c.round("12DDDsZ").await;
    // Again, ended by Flush rather than Sync.
    c.execute("cur", 3).flush();
    c.round("DDDs").await;
    c.execute("cur", 3).sync();
    assert_eq!(status(&c.round("DCZ").await), b'T');
    assert_eq!(status(&c.simple("COMMIT", "CZ").await), b'I');
}

async fn flush(c: &mut Client) {
    c.parse("", "SELECT $1::int4 + 1 AS n", &[INT4])
        .describe(b'S', "")
        .flush();
    c.round("1tT").await;
    c.bind("", "", &["41"]).execute("", 0).sync();
    c.round("2DCZ").await;
    // The same with a named statement (renamed by Sluice).
    c.parse("f1", "SELECT $1::text AS echo", &[TEXT])
        .describe(b'S', "f1")
        .flush();
    c.round("1tT").await;
    c.bind("", "f1", &["flushed"]).execute("", 0).sync();
    c.round("2DCZ").await;
}

async fn evicted_reprepared(c: &mut Client) {
    // With room for two statements per server connection, the third evicts the first.
    for (name, sql) in [
        ("a", "SELECT 1 AS a"),
        ("b", "SELECT 2 AS b"),
        ("c", "SELECT 3 AS c"),
    ] {
        c.parse(name, sql, &[])
            .bind("", name, &[])
            .execute("", 0)
            .sync();
        c.round("12DCZ").await;
    }
    // "a" again: evicted, so Sluice closes the least recently used and prepares "a" again.
    c.bind("", "a", &[]).execute("", 0).sync();
    c.round("2DCZ").await;
    c.describe(b'S', "b").sync();
    c.round("tTZ").await;
    c.bind("", "c", &[]).execute("", 0).sync();
    c.round("2DCZ").await;
    // Closed and parsed again: a statement the server lacks by now.
    c.close(b'S', "a")
        .parse("a", "SELECT 1 AS a", &[])
        .bind("", "a", &[])
        .execute("", 0)
        .sync();
    c.round("312DCZ").await;
}

async fn deallocate_discard(c: &mut Client) {
    c.parse("s1", "SELECT 1 AS one", &[]).sync();
    c.round("1Z").await;
    c.parse("s2", "SELECT 2 AS two", &[]).sync();
    c.round("1Z").await;
    // Answered by Sluice: the client forgets s1.
    c.simple("DEALLOCATE s1", "CZ").await;
    c.bind("", "s1", &[]).execute("", 0).sync();
    c.round("EZ").await;
    c.bind("", "s2", &[]).execute("", 0).sync();
    c.round("2DCZ").await;
    // A name the client never prepared goes to the server.
    c.simple("DEALLOCATE nope", "EZ").await;
    c.simple("DEALLOCATE ALL", "CZ").await;
    c.bind("", "s2", &[]).execute("", 0).sync();
    c.round("EZ").await;
    c.parse("s3", "SELECT 3 AS three", &[])
        .bind("", "s3", &[])
        .execute("", 0)
        .sync();
    c.round("12DCZ").await;
    c.simple("DISCARD ALL", "CZ").await;
    c.bind("", "s3", &[]).execute("", 0).sync();
    c.round("EZ").await;
    c.parse("s3", "SELECT 3 AS three", &[])
        .bind("", "s3", &[])
        .execute("", 0)
        .sync();
    c.round("12DCZ").await;
}

async fn session_state_reject(c: &mut Client) {
    // Refused by Sluice itself, never sent to the server.
    c.simple("SET statement_timeout = '5s'", "EZ").await;
    c.simple("LISTEN some_channel", "EZ").await;
    // A named Parse of a SET: refused, and the batch is dropped up to its Sync.
    c.parse("setter", "SET search_path = public", &[])
        .bind("", "setter", &[])
        .execute("", 0)
        .sync();
    c.round("EZ").await;
    // Transaction-scoped settings are fine.
    c.simple("BEGIN", "CZ").await;
    c.simple("SET LOCAL statement_timeout = '5s'", "CZ").await;
    c.simple("COMMIT", "CZ").await;
    c.simple("SELECT 'still here' AS status", "TDCZ").await;
}

async fn session_state_pin(c: &mut Client) {
    // A session SET outside a block pins the client to its server for good.
    c.simple("SET application_name = 'pinned_app'", "CSZ").await;
    c.simple("SHOW application_name", "TDCZ").await;
    c.parse("", "SELECT current_setting('application_name') AS app", &[])
        .bind("", "", &[])
        .execute("", 0)
        .sync();
    c.round("12DCZ").await;
    c.parse("p1", "SELECT $1::int4 AS n", &[INT4])
        .bind("", "p1", &["5"])
        .execute("", 0)
        .sync();
    c.round("12DCZ").await;
    c.simple("BEGIN", "CZ").await;
    c.simple("SELECT 1 AS inside", "TDCZ").await;
    c.simple("COMMIT", "CZ").await;
}

async fn session_pooling(c: &mut Client) {
    c.simple("SELECT 1 AS one", "TDCZ").await;
    // Names go to the server as the client gave them.
    c.parse("s1", "SELECT $1::int4 AS n", &[INT4])
        .bind("", "s1", &["7"])
        .execute("", 0)
        .sync();
    c.round("12DCZ").await;
    c.bind("", "s1", &["8"]).execute("", 0).sync();
    c.round("2DCZ").await;
    c.close(b'S', "s1").sync();
    c.round("3Z").await;
    c.simple("SET application_name = 'session_app'", "CSZ")
        .await;
    c.simple("BEGIN; SELECT 2 AS two; COMMIT", "CTDCCZ").await;
}

/// Bytes per write when the client streams a large message.
const PART: usize = 64 * 1024;

async fn large_message(c: &mut Client) {
    c.simple("BEGIN", "CZ").await;
    // A Query of about 300 KB, written in parts.
    let sql = format!("SELECT length('{}') AS len", "x".repeat(300_000));
    c.query(&sql);
    let whole = c.out.split();
    for part in whole.chunks(PART) {
        c.out.extend_from_slice(part);
        c.send_alone().await;
    }
    let m = c.expect("TDCZ").await;
    assert_eq!(
        crate::support::raw::row_text(&m[1].1),
        [Some("300000".into())]
    );
    // A CopyData of 100 KB (not looked into by Sluice: streamed through), written in parts.
    c.simple("COPY copy_target FROM STDIN", "G").await;
    c.copy_data(format!("1\t{}\n", "z".repeat(100_000)).as_bytes());
    let whole = c.out.split();
    for part in whole.chunks(PART) {
        c.out.extend_from_slice(part);
        c.send_alone().await;
    }
    c.copy_done();
    c.round("CZ").await;
    // About 1 MB of DataRows, one of them 100 KB.
    let rows = 1000;
    let want = format!("T{}CZ", "D".repeat(rows));
    c.simple(
        "SELECT g, repeat('x', CASE WHEN g = 500 THEN 100000 ELSE 900 END) AS filler \
         FROM generate_series(1, 1000) g",
        &want,
    )
    .await;
    c.simple("COMMIT", "CZ").await;
}
