//! `RESET ALL`, `RESET name`, `SET name TO DEFAULT` and `DISCARD ALL` give each client its own
//! startup values back: the same simple queries sent straight to PostgreSQL and through Sluice,
//! by clients with different startup parameters sharing a small pool, get the same answers,
//! message for message, ParameterStatus included. In transaction pooling (clients that share a
//! server, and one pinned to its own) and in session pooling (clients one after the other on
//! one server).

use std::net::SocketAddr;
use std::time::Duration;

use sluice::config::PoolMode;

use crate::proxy::start_sluice;
use crate::support::raw::{seen, Raw};
use crate::support::{direct_addr, start_pg_with_user};

const USER: &str = "reset_app";
const PASSWORD: &str = "reset-pw";
const DB: &str = "reset_db";

/// One client: its startup parameters, and requests to run before the shared script.
struct Client {
    params: &'static [(&'static str, &'static str)],
    prelude: &'static [&'static str],
}

const A: Client = Client {
    params: &[
        ("application_name", "app_a"),
        ("TimeZone", "Asia/Tokyo"),
        ("DateStyle", "SQL, DMY"),
        (
            "options",
            "-c search_path=a_schema,public -c statement_timeout=4321ms -c work_mem=3MB",
        ),
    ],
    prelude: &[],
};

const B: Client = Client {
    params: &[
        ("application_name", "app_b"),
        ("TimeZone", "utc"),
        ("search_path", "b_schema"),
        ("options", "-c work_mem=5MB"),
    ],
    prelude: &[],
};

/// No startup parameters: PostgreSQL's defaults (an empty `application_name`, not the server
/// connection's `sluice`).
const PLAIN: Client = Client {
    params: &[],
    prelude: &[],
};

/// Pinned to its server by a session SET outside a transaction block.
const PINNED: Client = Client {
    params: &[
        ("application_name", "app_pinned"),
        ("TimeZone", "Europe/Paris"),
        ("options", "-c statement_timeout=999ms"),
    ],
    prelude: &["SET work_mem = '9MB'"],
};

const CHECK: &str = "SELECT current_setting('application_name') AS app, \
    current_setting('TimeZone') AS tz, current_setting('search_path') AS path, \
    current_setting('DateStyle') AS ds, current_setting('statement_timeout') AS st, \
    current_setting('work_mem') AS wm";

/// Changes the settings inside a transaction block (one statement per Query: a session SET in
/// a block does not pin), so that a reset has something to undo.
const CHANGE: &[&str] = &[
    "BEGIN",
    "SET application_name = 'changed'",
    "SET TimeZone = 'America/New_York'",
    "SET search_path = public",
    "SET DateStyle = 'German'",
    "SET statement_timeout = '1s'",
    "SET work_mem = '7MB'",
    "COMMIT",
];

/// The script every client runs, unit by unit: a unit leaves no transaction open, so clients
/// sharing one server can take turns between units.
const SCRIPT: &[&[&str]] = &[
    &[CHECK],
    CHANGE,
    &[CHECK],
    &["RESET ALL"],
    &[CHECK],
    CHANGE,
    &["RESET application_name"],
    &["RESET TIME ZONE"],
    &["SET DateStyle TO DEFAULT"],
    &["SET search_path = DEFAULT; SHOW search_path"],
    &[CHECK],
    &["RESET statement_timeout; reset work_mem"],
    &[CHECK],
    &["SET application_name = 'x'; RESET ALL; SHOW application_name"],
    &[CHECK],
    &["SET TimeZone = 'UTC'; RESET ALL; SELECT current_setting('TimeZone'); SELECT 1/0"],
    &[CHECK],
    CHANGE,
    &["/* first */ RESET ALL; SELECT current_setting('TimeZone') AS tz -- last"],
    &[
        "BEGIN",
        "SET application_name = 'in_block'",
        "RESET ALL",
        CHECK,
        "ROLLBACK",
    ],
    &[CHECK],
    &[
        "BEGIN",
        "SET TimeZone = 'UTC'",
        "RESET ALL; SHOW application_name",
        "COMMIT",
    ],
    &[CHECK],
    &[
        "BEGIN",
        "SET work_mem = '1MB'",
        "SET LOCAL work_mem TO DEFAULT",
        "SHOW work_mem",
        "COMMIT",
    ],
    &[CHECK],
    &["RESET ALL"],
    CHANGE,
    &["DISCARD ALL"],
    &[CHECK],
    &[
        "BEGIN",
        "SET application_name = 'doomed'",
        "DISCARD ALL",
        "ROLLBACK",
    ],
    &[CHECK],
    &["SET TimeZone = 'UTC'; SELECT 1; RESET TimeZone"],
    &[CHECK],
];

/// The login's report of the client's own settings.
fn own_reported(reported: &[(String, String)]) -> Vec<(String, String)> {
    reported
        .iter()
        .filter(|(n, _)| ["application_name", "TimeZone", "DateStyle"].contains(&n.as_str()))
        .cloned()
        .collect()
}

/// How the script's statements are sent.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// Each step as a simple Query.
    Simple,
    /// Each step of one statement through the extended protocol (the unnamed statement, as
    /// drivers' `execute` does); steps of several statements as a simple Query.
    Extended,
}

/// Runs `clients` against `addr`, taking turns unit by unit (`together`) or one client after
/// the other, each from login to goodbye; returns every client's transcript.
async fn run(
    addr: SocketAddr,
    clients: &[&Client],
    together: bool,
    protocol: Protocol,
) -> Vec<Vec<Vec<String>>> {
    async fn login(addr: SocketAddr, c: &Client) -> (Raw, Vec<Vec<String>>) {
        let (raw, reported, _, _) =
            Raw::login_with(addr, false, USER, PASSWORD, DB, c.params).await;
        let login = own_reported(&reported)
            .into_iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        (raw, vec![login])
    }
    async fn unit(raw: &mut Raw, steps: &[&str], out: &mut Vec<Vec<String>>, p: Protocol) {
        for sql in steps {
            let mut answer = vec![format!("> {sql}")];
            let msgs = if p == Protocol::Extended && !sql.contains(';') {
                raw.extended(sql).await
            } else {
                raw.query(sql).await
            };
            answer.extend(seen(&msgs));
            out.push(answer);
        }
    }
    let units = |c: &Client| {
        std::iter::once(c.prelude)
            .chain(SCRIPT.iter().copied())
            .collect::<Vec<_>>()
    };
    let mut transcripts = Vec::new();
    if together {
        let mut conns = Vec::new();
        for c in clients {
            conns.push(login(addr, c).await);
        }
        for i in 0..=SCRIPT.len() {
            for ((raw, out), c) in conns.iter_mut().zip(clients) {
                let steps = if i == 0 { c.prelude } else { SCRIPT[i - 1] };
                unit(raw, steps, out, protocol).await;
            }
        }
        transcripts.extend(conns.into_iter().map(|(_, out)| out));
    } else {
        for c in clients {
            let (mut raw, mut out) = login(addr, c).await;
            for u in units(c) {
                unit(&mut raw, u, &mut out, protocol).await;
            }
            let mut bye = bytes::BytesMut::new();
            postgres_protocol::message::frontend::terminate(&mut bye);
            raw.send(&bye).await;
            raw.until_eof().await;
            transcripts.push(out);
        }
    }
    transcripts
}

fn compare(want: &[Vec<Vec<String>>], got: &[Vec<Vec<String>>]) {
    for (k, (w, g)) in want.iter().zip(got).enumerate() {
        for (i, (w, g)) in w.iter().zip(g).enumerate() {
            assert_eq!(
                g, w,
                "client {k}, step {i}: through Sluice (left) and directly (right) differ"
            );
        }
        assert_eq!(g.len(), w.len());
    }
    // Identical mistakes on both sides would pass the comparison: pin what PostgreSQL says.
    for w in want {
        let app = w[0]
            .iter()
            .find_map(|r| r.strip_prefix("application_name="))
            .expect("the login reports application_name");
        let at = w
            .iter()
            .position(|step| step[0] == "> RESET ALL")
            .expect("a RESET ALL");
        let reported = format!("S \"application_name\\0{app}\\0\"");
        assert!(
            w[at].contains(&reported),
            "RESET ALL reports the startup value: {:?}",
            w[at]
        );
        if app == "app_a" {
            let after = &w[at + 1];
            assert!(
                after.iter().any(|m| m.contains("app_a")
                    && m.contains("Asia/Tokyo")
                    && m.contains("a_schema")
                    && m.contains("4321ms")
                    && m.contains("3MB")),
                "{after:?}"
            );
        }
    }
}

async fn check(mode: PoolMode, pool_size: u32, clients: &[&Client], together: bool) {
    for protocol in [Protocol::Simple, Protocol::Extended] {
        check_with(mode, pool_size, clients, together, protocol).await;
    }
}

async fn check_with(
    mode: PoolMode,
    pool_size: u32,
    clients: &[&Client],
    together: bool,
    protocol: Protocol,
) {
    let pg = start_pg_with_user(Default::default(), USER, PASSWORD, DB).await;
    let sluice = start_sluice(&pg, USER, PASSWORD, DB, pool_size, pool_size, |c| {
        c.pool_mode = mode;
        c.wait_timeout = Duration::from_secs(10);
    })
    .await;
    let direct = direct_addr(&pg);
    let want = run(direct, clients, together, protocol).await;
    let got = run(sluice.local_addr, clients, together, protocol).await;
    compare(&want, &got);
    sluice.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_gives_back_startup_values_in_transaction_pooling() {
    // A and B share one server; the pinned client keeps the other.
    check(PoolMode::Transaction, 2, &[&PINNED, &A, &B, &PLAIN], true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_gives_back_startup_values_one_server_shared() {
    check(PoolMode::Transaction, 1, &[&A, &PLAIN, &B], true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_gives_back_startup_values_in_session_pooling() {
    // One server, its clients one after the other.
    check(PoolMode::Session, 1, &[&A, &B, &PLAIN, &A], false).await;
}

/// One request of [`extended_steps`].
enum Req {
    /// A simple Query.
    Simple(&'static str),
    /// Parse of a named statement, and Sync.
    Prepare(&'static str, &'static str),
    /// Bind, Describe and Execute of each statement (named, or `""` with its text), then one
    /// Sync.
    Run(&'static [(&'static str, Option<&'static str>)]),
}

/// Resets through the extended protocol beyond a driver's `execute`: a named statement run
/// again in later transactions, a pipeline that fails after its reset, a DISCARD ALL that
/// deallocates itself; another client shares the server between requests.
async fn extended_steps(addr: SocketAddr) -> Vec<Vec<String>> {
    use Req::*;
    let steps: &[Req] = &[
        Prepare("reset_all", "RESET ALL"),
        Prepare("reset_tz", "RESET TimeZone"),
        Simple("BEGIN; SET application_name = 'x'; SET TimeZone = 'UTC'; COMMIT"),
        Run(&[("reset_tz", None)]),
        Simple(CHECK),
        Run(&[("reset_all", None)]),
        Simple(CHECK),
        Simple("BEGIN; SET application_name = 'y'; SET TimeZone = 'UTC'; COMMIT"),
        // The pipeline fails after its reset: its implicit transaction, the reset with it, is
        // rolled back.
        Run(&[("", Some("RESET ALL")), ("", Some("SELECT 1/0"))]),
        Simple(CHECK),
        // Two resets in one pipeline. (A statement after a reset in the same pipeline would
        // still see the server connection's defaults: the startup values are put back once
        // the pipeline is answered. See README.)
        Simple("BEGIN; SET application_name = 'w'; SET TimeZone = 'UTC'; COMMIT"),
        Run(&[("", Some("RESET ALL")), ("reset_tz", None)]),
        Simple(CHECK),
        Prepare("discard", "DISCARD ALL"),
        Simple("BEGIN; SET application_name = 'z'; COMMIT"),
        Run(&[("discard", None)]),
        Simple(CHECK),
        // DISCARD ALL deallocated every statement, itself included.
        Run(&[("discard", None)]),
        Run(&[("reset_all", None)]),
        Simple(CHECK),
    ];
    let (mut a, reported, _, _) = Raw::login_with(addr, false, USER, PASSWORD, DB, A.params).await;
    let (mut b, _, _, _) = Raw::login_with(addr, false, USER, PASSWORD, DB, B.params).await;
    let mut out = vec![own_reported(&reported)
        .into_iter()
        .map(|(n, v)| format!("{n}={v}"))
        .collect::<Vec<_>>()];
    for step in steps {
        let mut buf = bytes::BytesMut::new();
        let (shown, msgs) = match step {
            Simple(sql) => (format!("> {sql}"), a.query(sql).await),
            Prepare(name, sql) => {
                postgres_protocol::message::frontend::parse(
                    name,
                    sql,
                    std::iter::empty(),
                    &mut buf,
                )
                .expect("encode");
                postgres_protocol::message::frontend::sync(&mut buf);
                a.send(&buf).await;
                (format!("> prepare {name}: {sql}"), a.until_ready().await)
            }
            Run(stmts) => {
                for (name, sql) in stmts.iter() {
                    Raw::put_run(&mut buf, name, *sql);
                }
                postgres_protocol::message::frontend::sync(&mut buf);
                a.send(&buf).await;
                (format!("> run {:?}", stmts), a.until_ready().await)
            }
        };
        let mut answer = vec![shown];
        answer.extend(seen(&msgs));
        out.push(answer);
        // The other client takes the server in between (one server in the pool).
        let theirs = seen(&b.query(CHECK).await);
        assert!(theirs.iter().any(|m| m.contains("app_b")), "{theirs:?}");
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_resets_named_failed_and_discarded() {
    let pg = start_pg_with_user(Default::default(), USER, PASSWORD, DB).await;
    for mode in [PoolMode::Transaction, PoolMode::Session] {
        let sluice = start_sluice(&pg, USER, PASSWORD, DB, 2, 2, |c| {
            c.pool_mode = mode;
            c.wait_timeout = Duration::from_secs(10);
        })
        .await;
        let direct = direct_addr(&pg);
        let want = extended_steps(direct).await;
        let got = extended_steps(sluice.local_addr).await;
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            assert_eq!(
                g, w,
                "{mode:?}, step {i}: through Sluice (left) and directly (right)"
            );
        }
        assert_eq!(got.len(), want.len());
        // What PostgreSQL says, pinned: the named RESET ALL brought back the startup values.
        assert!(
            want[7]
                .iter()
                .any(|m| m.contains("app_a") && m.contains("Asia/Tokyo")),
            "{:?}",
            want[7]
        );
        sluice.stop().await;
    }
}
