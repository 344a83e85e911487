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
use crate::support::raw::{fields, Msg, Raw};
use crate::support::start_pg_with_user;

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

/// What a client sees of one answer: each message's tag and body, except that error and notice
/// fields other than severity, SQLSTATE, message, detail and hint are left out.
fn seen(msgs: &[Msg]) -> Vec<String> {
    msgs.iter()
        .map(|(tag, body)| match tag {
            b'E' | b'N' => {
                let f = fields(body);
                let keep: Vec<String> = ['S', 'C', 'M', 'D', 'H']
                    .iter()
                    .filter_map(|k| f.get(k).map(|v| format!("{k}={v}")))
                    .collect();
                format!("{} {}", char::from(*tag), keep.join(" | "))
            }
            _ => format!("{} {:?}", char::from(*tag), String::from_utf8_lossy(body)),
        })
        .collect()
}

/// The login's report of the client's own settings.
fn own_reported(reported: &[(String, String)]) -> Vec<(String, String)> {
    reported
        .iter()
        .filter(|(n, _)| ["application_name", "TimeZone", "DateStyle"].contains(&n.as_str()))
        .cloned()
        .collect()
}

/// Runs `clients` against `addr`, taking turns unit by unit (`together`) or one client after
/// the other, each from login to goodbye; returns every client's transcript.
async fn run(addr: SocketAddr, clients: &[&Client], together: bool) -> Vec<Vec<Vec<String>>> {
    async fn login(addr: SocketAddr, c: &Client) -> (Raw, Vec<Vec<String>>) {
        let (raw, reported, _, _) =
            Raw::login_with(addr, false, USER, PASSWORD, DB, c.params).await;
        let login = own_reported(&reported)
            .into_iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        (raw, vec![login])
    }
    async fn unit(raw: &mut Raw, steps: &[&str], out: &mut Vec<Vec<String>>) {
        for sql in steps {
            let mut answer = vec![format!("> {sql}")];
            answer.extend(seen(&raw.query(sql).await));
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
                unit(raw, steps, out).await;
            }
        }
        transcripts.extend(conns.into_iter().map(|(_, out)| out));
    } else {
        for c in clients {
            let (mut raw, mut out) = login(addr, c).await;
            for u in units(c) {
                unit(&mut raw, u, &mut out).await;
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
    let pg = start_pg_with_user(Default::default(), USER, PASSWORD, DB).await;
    let sluice = start_sluice(&pg, USER, PASSWORD, DB, pool_size, pool_size, |c| {
        c.pool_mode = mode;
        c.wait_timeout = Duration::from_secs(10);
    })
    .await;
    let direct: SocketAddr = format!("{}:{}", pg.host(), pg.port())
        .parse()
        .expect("addr");
    let want = run(direct, clients, together).await;
    let got = run(sluice.local_addr, clients, together).await;
    compare(&want, &got);
    sluice.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_gives_back_startup_values_in_transaction_pooling() {
    // A and B share one server; the pinned client keeps the other.
    check(PoolMode::Transaction, 2, &[&PINNED, &A, &B], true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_gives_back_startup_values_one_server_shared() {
    check(PoolMode::Transaction, 1, &[&A, &B], true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_gives_back_startup_values_in_session_pooling() {
    // One server, its clients one after the other.
    check(PoolMode::Session, 1, &[&A, &B, &A], false).await;
}
