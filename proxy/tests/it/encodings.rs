//! Client encodings other than UTF-8: query text and statement names are the client's bytes,
//! and Sluice's scanners split and read them as PostgreSQL does. PostgreSQL itself is the
//! oracle: each generated Query is sent to it directly (how many statements ran, whether one of
//! them was a LISTEN) and through Sluice, which must answer byte for byte the same, or refuse
//! exactly the Queries that really LISTEN (`on_session_state = "reject"`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::process::{Command, Stdio};

use bytes::{BufMut, BytesMut};
use sluice::config::OnSessionState;
use sluice::sql::{self, Encoding, Pin};

use crate::drivers::require_python;
use crate::pg::PgServer;
use crate::proxy::start_sluice;
use crate::support::raw::{error_code, fields, Msg, Raw};
use crate::support::{direct, direct_addr, start_pg_with_user};

const USER: &str = "enc_app";
const PASSWORD: &str = "enc-pw";
const DB: &str = "enc_db";

/// Client encodings: the ASCII-safe ones and every one whose multibyte characters can have
/// trailing bytes in the ASCII range.
const ENCODINGS: &[&str] = &[
    "UTF8",
    "LATIN1",
    "WIN1252",
    "EUC_JP",
    "EUC_KR",
    "SJIS",
    "SHIFT_JIS_2004",
    "BIG5",
    "GBK",
    "UHC",
    "GB18030",
    "JOHAB",
];

/// Characters of `encoding` as its bytes, from PostgreSQL's own conversion: first those with a
/// trailing byte in the ASCII range (what a byte scanner gets wrong), then a few others.
async fn repertoire(pg: &PgServer, encoding: &str) -> Vec<Vec<u8>> {
    let c = direct(&pg.url(USER, PASSWORD, DB)).await;
    c.batch_execute(
        "CREATE OR REPLACE FUNCTION pg_temp.enc(t text, e name) RETURNS bytea LANGUAGE plpgsql AS
         $$ BEGIN RETURN convert_to(t, e); EXCEPTION WHEN others THEN RETURN NULL; END $$",
    )
    .await
    .expect("function");
    let mut points: Vec<i32> = Vec::new();
    points.extend((0xa0..0x100).step_by(3));
    points.extend([0x20ac, 0x391, 0x3a9, 0x410, 0x44f]);
    points.extend((0x3041..0x3097).step_by(2));
    points.extend(0x30a1..0x30fb);
    points.extend(0xff61..0xffa0);
    points.extend((0x4e00..0x9fa6).step_by(13));
    points.extend((0xac00..0xd7a4).step_by(29));
    points.extend((0x3131..0x318f).step_by(3));
    points.extend((0x20000..0x20200).step_by(31));
    let rows = c
        .query(
            "SELECT pg_temp.enc(chr(cp), $1::text::name) FROM unnest($2::int[]) cp",
            &[&encoding, &points],
        )
        .await
        .expect("convert");
    let mut tricky = Vec::new();
    let mut plain = Vec::new();
    for row in rows {
        let Some(bytes) = row.get::<_, Option<Vec<u8>>>(0) else {
            continue;
        };
        if bytes.len() > 1 && bytes[1..].iter().any(|b| *b < 0x80) {
            tricky.push(bytes);
        } else if bytes.iter().any(|b| *b >= 0x80) {
            plain.push(bytes);
        }
    }
    if encoding == "JOHAB" {
        // PostgreSQL converts these to JOHAB but refuses them as input (22021: its check wants
        // every byte of a JOHAB character high), so no Query holds one.
        tricky.clear();
    }
    tricky.truncate(400);
    plain.truncate(40);
    tricky.extend(plain);
    tricky
}

/// A small deterministic generator (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

/// Text for inside a literal, identifier or comment: characters of the encoding mixed with
/// the ASCII that matters to a scanner. `avoid` bytes are left out.
fn text(rng: &mut Rng, chars: &[Vec<u8>], avoid: &[u8]) -> Vec<u8> {
    const ASCII: &[&[u8]] = &[
        b"a",
        b"E",
        b" ",
        b";",
        b"; LISTEN hidden; ",
        b"\\",
        b"'",
        b"\"",
        b"$",
        b"--",
        b"/*",
        b"*/",
        b"e'",
        b"$$",
    ];
    let mut out = Vec::new();
    for _ in 0..1 + rng.below(8) {
        if rng.below(3) == 0 || chars.is_empty() {
            let a = *rng.pick(ASCII);
            if !a.iter().any(|b| avoid.contains(b)) {
                out.extend_from_slice(a);
            }
        } else {
            out.extend_from_slice(rng.pick::<Vec<u8>>(chars));
        }
    }
    out
}

/// One statement, and whether it is a real LISTEN.
fn statement(rng: &mut Rng, chars: &[Vec<u8>]) -> (Vec<u8>, bool) {
    let mut s = Vec::new();
    let mut listen = false;
    match rng.below(9) {
        0 => {
            // A standard string: quotes doubled, backslashes plain.
            s.extend_from_slice(b"SELECT '");
            for &b in &text(rng, chars, b"") {
                if b == b'\'' {
                    s.push(b'\'');
                }
                s.push(b);
            }
            s.push(b'\'');
        }
        1 => {
            // An E'' string: ASCII backslashes only as escapes.
            s.extend_from_slice(b"SELECT E'");
            for &b in &text(rng, chars, b"\\") {
                if b == b'\'' {
                    s.extend_from_slice(if rng.below(2) == 0 { b"\\'" } else { b"''" });
                } else {
                    s.push(b);
                }
            }
            s.extend_from_slice(if rng.below(2) == 0 { b"\\\\'" } else { b"'" });
        }
        2 => {
            // Dollar quoting, the tag possibly a multibyte character.
            let tag: Vec<u8> = match rng.below(3) {
                0 => b"$$".to_vec(),
                1 => b"$q$".to_vec(),
                _ => [&b"$"[..], rng.pick::<Vec<u8>>(chars), b"$"].concat(),
            };
            let body = text(rng, chars, b"$");
            s.extend_from_slice(b"SELECT ");
            s.extend_from_slice(&tag);
            s.extend_from_slice(&body);
            s.extend_from_slice(&tag);
        }
        3 => {
            s.extend_from_slice(b"SELECT 1 AS \"");
            let body = text(rng, chars, b"\"");
            s.extend_from_slice(if body.is_empty() { b"x" } else { &body });
            s.push(b'"');
        }
        4 => {
            s.extend_from_slice(b"/* ");
            s.extend_from_slice(&text(rng, chars, b"*/"));
            s.extend_from_slice(b" */ SELECT 2");
        }
        5 => {
            s.extend_from_slice(b"SELECT 3 -- ");
            s.extend_from_slice(&text(rng, chars, b""));
            s.push(b'\n');
        }
        6 => {
            // An identifier of multibyte characters, then more SQL.
            s.extend_from_slice(b"SELECT 4 AS ");
            s.extend_from_slice(rng.pick::<Vec<u8>>(chars));
            s.extend_from_slice(b"x");
        }
        _ => {
            s.extend_from_slice(b"LISTEN enc_chan");
            listen = true;
        }
    }
    (s, listen)
}

/// A Query of one to four statements.
fn query(rng: &mut Rng, chars: &[Vec<u8>]) -> Vec<u8> {
    let mut q = Vec::new();
    for i in 0..1 + rng.below(4) {
        if i > 0 {
            const SEPARATORS: &[&[u8]] = &[b";", b"; ", b" ;\n", b";;"];
            q.extend_from_slice(rng.pick::<&[u8]>(SEPARATORS));
        }
        q.extend_from_slice(&statement(rng, chars).0);
    }
    if rng.below(2) == 0 {
        q.push(b';');
    }
    q
}

fn command_tags(msgs: &[Msg]) -> Vec<String> {
    msgs.iter()
        .filter(|(t, _)| *t == b'C')
        .map(|(_, b)| String::from_utf8_lossy(b.strip_suffix(b"\0").unwrap_or(b)).into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scanners_split_every_client_encoding_as_postgresql_does() {
    let pg = start_pg_with_user(Default::default(), USER, PASSWORD, DB).await;
    // A small pool: the clients' encodings take turns on the same two servers.
    let sluice = start_sluice(&pg, USER, PASSWORD, DB, 4, 2, |c| {
        c.on_session_state = OnSessionState::Reject;
    })
    .await;
    let mut clients = Vec::new();
    for &enc in ENCODINGS {
        let chars = repertoire(&pg, enc).await;
        if ["SJIS", "SHIFT_JIS_2004", "BIG5", "GBK", "UHC", "GB18030"].contains(&enc) {
            assert!(
                chars.iter().any(|c| c[1..].iter().any(|b| *b < 0x80)),
                "{enc}: no character with an ASCII trailing byte found"
            );
        }
        let params = [("client_encoding", enc)];
        let (d, _, _, _) =
            Raw::login_with(direct_addr(&pg), false, USER, PASSWORD, DB, &params).await;
        let (s, _, _, _) =
            Raw::login_with(sluice.local_addr, false, USER, PASSWORD, DB, &params).await;
        clients.push((enc, Encoding::from_name(enc), chars, d, s));
    }
    let seed = std::env::var("ENCODING_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_1234_u64);
    let mut rng = Rng(seed);
    let mut checked: HashMap<&str, (usize, usize)> = HashMap::new();
    for round in 0..120 {
        for (enc, encoding, chars, d, s) in &mut clients {
            let q = query(&mut rng, chars);
            let shown = String::from_utf8_lossy(&q).into_owned();
            let want = d.query_bytes(&q).await;
            let entry = checked.entry(enc).or_default();
            if error_code(&want).is_some() {
                // Not valid SQL after all (say, a character the server encoding lacks): the
                // boundaries PostgreSQL would have found are unknown.
                entry.1 += 1;
                continue;
            }
            entry.0 += 1;
            let tags = command_tags(&want);
            let ours = sql::statements(&q, *encoding).count();
            assert_eq!(
                ours,
                tags.len(),
                "{enc}, round {round}: Sluice splits {shown:?} into {ours} statements, PostgreSQL ran {tags:?} (seed {seed})"
            );
            let listens = tags.iter().any(|t| t == "LISTEN");
            let pin = sql::pins(&q, *encoding);
            assert_eq!(
                pin == Some(Pin::Listen),
                listens,
                "{enc}, round {round}: {shown:?} pins {pin:?} (seed {seed})"
            );
            let got = s.query_bytes(&q).await;
            if listens {
                assert_eq!(
                    error_code(&got).as_deref(),
                    Some("0A000"),
                    "{enc}: a real LISTEN is refused: {shown:?}"
                );
            } else {
                assert_eq!(
                    got, want,
                    "{enc}, round {round}: through Sluice (left) and directly (right) differ for {shown:?} (seed {seed})"
                );
            }
        }
    }
    for (enc, (valid, invalid)) in &checked {
        assert!(
            *valid > 4 * *invalid,
            "{enc}: only {valid} valid queries of {}",
            valid + invalid
        );
    }
}

/// Messages with the source-code fields (file, line, routine) left out of errors: an error
/// Sluice answers itself has none.
fn without_source(msgs: &[Msg]) -> Vec<Msg> {
    msgs.iter()
        .map(|(tag, body)| {
            if *tag != b'E' {
                return (*tag, body.clone());
            }
            let mut out = Vec::new();
            let mut rest = &body[..];
            while let Some((&kind, tail)) = rest.split_first() {
                if kind == 0 {
                    break;
                }
                let end = tail.iter().position(|b| *b == 0).unwrap_or(tail.len());
                if !matches!(kind, b'F' | b'L' | b'R') {
                    out.push(kind);
                    out.extend_from_slice(&tail[..=end.min(tail.len() - 1)]);
                }
                rest = &tail[(end + 1).min(tail.len())..];
            }
            out.push(0);
            (*tag, out)
        })
        .collect()
}

/// A Parse/Bind/Execute/Sync of `sql` under the statement `name` (raw bytes).
fn prepared_step(b: &mut BytesMut, name: &[u8], sql: &[u8]) {
    b.put_u8(b'P');
    b.put_u32((4 + name.len() + 1 + sql.len() + 1 + 2) as u32);
    b.put_slice(name);
    b.put_u8(0);
    b.put_slice(sql);
    b.put_u8(0);
    b.put_u16(0);
    b.put_u8(b'B');
    b.put_u32((4 + 1 + name.len() + 1 + 2 + 2 + 2) as u32);
    b.put_u8(0);
    b.put_slice(name);
    b.put_u8(0);
    b.put_u16(0);
    b.put_u16(0);
    b.put_u16(0);
    b.put_u8(b'E');
    b.put_u32(4 + 1 + 4);
    b.put_u8(0);
    b.put_u32(0);
    b.put_u8(b'S');
    b.put_u32(4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_names_and_errors_are_the_clients_bytes() {
    let pg = start_pg_with_user(Default::default(), USER, PASSWORD, DB).await;
    let sluice = start_sluice(&pg, USER, PASSWORD, DB, 4, 1, |_| {}).await;
    // SJIS "ソ表" (0x83 0x5C, 0x95 0x5C): both characters end in a backslash byte.
    let name: &[u8] = b"s\x83\x5c\x95\x5c";
    let run = |addr: SocketAddr| async move {
        let params = [("client_encoding", "SJIS")];
        let (mut c, _, _, _) = Raw::login_with(addr, false, USER, PASSWORD, DB, &params).await;
        let mut seen = Vec::new();
        for sql in [&b"SELECT '\x83\x5c' AS \"\x95\x5c\""[..], b"SELECT 2"] {
            let mut b = BytesMut::new();
            prepared_step(&mut b, name, sql);
            c.send(&b).await;
            seen.push(c.until_ready().await);
        }
        let mut q = b"DEALLOCATE \"".to_vec();
        q.extend_from_slice(name);
        q.push(b'"');
        seen.push(c.query_bytes(&q).await);
        seen.push(c.query_bytes(&q).await);
        seen
    };
    let want = run(direct_addr(&pg)).await;
    let got = run(sluice.local_addr).await;
    assert_eq!(
        got.iter().map(|m| without_source(m)).collect::<Vec<_>>(),
        want.iter().map(|m| without_source(m)).collect::<Vec<_>>(),
        "through Sluice (left) and directly (right)"
    );
    // What PostgreSQL said, so that two identical mistakes cannot pass.
    let row = want[0]
        .iter()
        .find(|(t, _)| *t == b'D')
        .expect("a row")
        .1
        .clone();
    assert!(
        row.ends_with(b"\x83\x5c"),
        "the SJIS value comes back: {row:?}"
    );
    let dup = want[1].iter().find(|(t, _)| *t == b'E').expect("42P05");
    let f = fields(&dup.1);
    assert_eq!(f.get(&'C').map(String::as_str), Some("42P05"));
    assert!(
        dup.1.windows(name.len()).any(|w| w == name),
        "names the client's bytes"
    );
    assert_eq!(error_code(&want[3]).as_deref(), Some("26000"));
}

/// psql with a client encoding, directly and through Sluice: the same bytes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_in_latin1_win1252_sjis_and_euc_jp() {
    let pg = start_pg_with_user(Default::default(), USER, PASSWORD, DB).await;
    let sluice = start_sluice(&pg, USER, PASSWORD, DB, 4, 1, |_| {}).await;
    let cases: &[(&str, &[u8])] = &[
        ("LATIN1", b"caf\xe9 \xfc"),
        ("WIN1252", b"\x80 \x9c"),
        ("SJIS", b"\x83\x5c\x95\x5c\x94\x5c"),
        ("EUC_JP", b"\xa5\xbd\xc9\xbd"),
    ];
    for &(enc, text) in cases {
        let mut sql = b"SELECT '".to_vec();
        sql.extend_from_slice(text);
        sql.extend_from_slice(b"' AS v, length('");
        sql.extend_from_slice(text);
        sql.extend_from_slice(b"'); SET LOCAL work_mem = '2MB'; SELECT E'");
        sql.extend_from_slice(text);
        sql.extend_from_slice(b"\\\\'");
        let run = |port: u16| {
            let out = Command::new(pg.bin("psql"))
                .args(["-X", "-A", "-t", "-h", "127.0.0.1", "-p", &port.to_string()])
                .args(["-U", USER, "-d", DB, "-v", "ON_ERROR_STOP=1", "-c"])
                .arg(std::ffi::OsStr::from_bytes(&sql))
                .env("PGPASSWORD", PASSWORD)
                .env("PGCLIENTENCODING", enc)
                .stdin(Stdio::null())
                .output()
                .expect("psql runs");
            assert!(
                out.status.success(),
                "{enc} on {port}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            out.stdout
        };
        let want = run(pg.port());
        let got = run(sluice.local_addr.port());
        assert_eq!(
            got, want,
            "{enc}: through Sluice (left) and directly (right)"
        );
        assert!(
            want.windows(text.len()).any(|w| w == text),
            "{enc}: psql shows the text in its encoding: {want:?}"
        );
    }
}

const PSYCOPG: &str = r#"
import sys, psycopg
dsn, enc = sys.argv[1], sys.argv[2]
with psycopg.connect(dsn, client_encoding=enc, autocommit=True) as conn:
    text = {"LATIN1": "café ü", "WIN1252": "€ œ", "SJIS": "ソ表能", "EUC_JP": "ソ表能"}[enc]
    row = conn.execute("SELECT %s::text, length(%s), '" + text + "' || ';'", (text, text)).fetchone()
    assert row == (text, len(text), text + ";"), row
    conn.execute("SET application_name = 'x'; SELECT 1 AS \"" + text + "\"")
    cur = conn.execute("SELECT 1 AS \"" + text + "\"")
    assert cur.description[0].name == text, cur.description[0].name
    print(conn.info.encoding, row[0].encode(conn.info.encoding).hex())
"#;

/// psycopg 3 with each client encoding, several of them on one server in turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_in_latin1_win1252_sjis_and_euc_jp() {
    let python = require_python("psycopg");
    let pg = start_pg_with_user(Default::default(), USER, PASSWORD, DB).await;
    let sluice = start_sluice(&pg, USER, PASSWORD, DB, 4, 1, |_| {}).await;
    let via = format!(
        "host=127.0.0.1 port={} user={USER} password={PASSWORD} dbname={DB}",
        sluice.local_addr.port()
    );
    let straight = format!(
        "host=127.0.0.1 port={} user={USER} password={PASSWORD} dbname={DB}",
        pg.port()
    );
    let mut children = Vec::new();
    for enc in ["LATIN1", "WIN1252", "SJIS", "EUC_JP"] {
        for dsn in [&via, &straight] {
            let child = Command::new(&python)
                .args(["-c", PSYCOPG, dsn, enc])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("python runs");
            children.push((enc, dsn == &via, child));
        }
    }
    let mut seen: HashMap<(&str, bool), String> = HashMap::new();
    for (enc, through, child) in children {
        let out = child.wait_with_output().expect("python ends");
        assert!(
            out.status.success(),
            "{enc} (through Sluice: {through}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        seen.insert(
            (enc, through),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        );
    }
    for enc in ["LATIN1", "WIN1252", "SJIS", "EUC_JP"] {
        assert_eq!(seen[&(enc, true)], seen[&(enc, false)], "{enc}");
    }
}

/// A session setting with a non-ASCII value, set by a LATIN1 client inside a transaction block,
/// is carried to its next server as the same text (read back and applied independent of the
/// server session's encoding at the time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_ascii_settings_follow_a_latin1_client() {
    let pg = start_pg_with_user(Default::default(), USER, PASSWORD, DB).await;
    let sluice = start_sluice(&pg, USER, PASSWORD, DB, 4, 1, |_| {}).await;
    let show = |addr: SocketAddr, steal: bool| async move {
        let params = [("client_encoding", "LATIN1")];
        let (mut a, _, _, _) = Raw::login_with(addr, false, USER, PASSWORD, DB, &params).await;
        // Inside a transaction block a session SET does not pin.
        for q in [
            &b"BEGIN"[..],
            b"SET myapp.label = 'caf\xe9 \xfc'",
            b"COMMIT",
        ] {
            assert_eq!(error_code(&a.query_bytes(q).await), None);
        }
        if steal {
            // Another client, in UTF-8, takes the only server in between.
            let (mut b, _, _) = Raw::login(addr, false, USER, PASSWORD, DB).await;
            let other = b.query("SET LOCAL myapp.label = 'x'; SELECT 1").await;
            assert_eq!(error_code(&other), None, "the server was free");
        }
        a.query_bytes(b"SHOW myapp.label").await
    };
    let want = show(direct_addr(&pg), false).await;
    let got = show(sluice.local_addr, true).await;
    assert_eq!(got, want, "through Sluice (left) and directly (right)");
    let row = want.iter().find(|(t, _)| *t == b'D').expect("a row");
    assert!(row.1.ends_with(b"caf\xe9 \xfc"), "{:?}", row.1);
}
