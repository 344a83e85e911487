//! Captures the relay's byte fixtures (`proxy/src/relay/fixtures/`): real PostgreSQL sessions
//! through today's Sluice, recorded on both sides, for the relay core's golden tests.
//!
//! ```text
//! raw client → relay A → Sluice → relay B → PostgreSQL
//!              c / <              > / s
//! ```
//!
//! Ignored in CI; regenerate with
//! `cargo test -p sluice --test it relay_capture -- --ignored --nocapture`
//! (`RELAY_CAPTURE_ONLY=copy,flush` for some scenarios only, `RELAY_CAPTURE_QUIET_MS` to
//! lengthen the recorder's quiet period, `RELAY_CAPTURE_TRACE=1` to print every chunk as it
//! goes through). Every scenario is captured twice,
//! each time against a fresh PostgreSQL and Sluice, and written only if both captures are the
//! same. Recording starts after the client's first ReadyForQuery and ends with its Terminate.
//! One server connection (pool size 1) serves the client, which sends no startup settings but
//! user and database, so Sluice has no settings to apply in front of a request.

mod fixture;
mod recorder;
mod scenarios;

use std::net::SocketAddr;
use std::path::PathBuf;

use sluice::config::{Config, OnSessionState, Overrides, PoolMode, ServerTls};

use crate::pg::PgOptions;
use crate::support::raw::Raw;
use crate::support::{direct, start_pg_with_user, within};
use fixture::{check, normalise_statement_names, render, summary, Dir};
use recorder::{Recorder, CHUNK};

const USER: &str = "relay_app";
const PASSWORD: &str = "relay-app-pw";
const DB: &str = "relay_db";

/// The command that regenerates the fixtures.
const COMMAND: &str = "cargo test -p sluice --test it relay_capture -- --ignored --nocapture";

/// Tables the scenarios use, created straight on PostgreSQL before Sluice starts.
const SETUP: &str = "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL);
                     CREATE TABLE copy_target (id int, name text);";

struct Scenario {
    name: &'static str,
    about: &'static [&'static str],
    tweak: fn(&mut Config),
}

fn transaction(_: &mut Config) {}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "simple_query",
        about: &[
            "Simple Queries: single and multi-statement ones (one failing midway), a transaction",
            "block over several Queries, an error inside a block then ROLLBACK, an empty query and",
            "a notice.",
        ],
        tweak: transaction,
    },
    Scenario {
        name: "extended_pipelined",
        about: &[
            "Extended protocol: three unnamed Parse/Bind/Describe/Execute/Sync batches in one",
            "write; a named statement s1 (renamed by Sluice), used in later batches, parsed again",
            "without a Close (refused, 42P05, as PostgreSQL does), closed and parsed again (both",
            "answered by Sluice: the server has it), pipelined named batches with a named portal,",
            "Describe S s1, Close S s1 (answered by Sluice), and s1 used after its Close.",
        ],
        tweak: transaction,
    },
    Scenario {
        name: "error_mid_batch",
        about: &[
            "Errors in extended batches: a syntax error after a good statement, the messages after",
            "it skipped to Sync; an error at Execute with the next batch in the same write; a named",
            "Parse the server refuses (Sluice forgets it) and the name's reuse; a named Parse that",
            "succeeds before an error and one skipped after it; an error at Bind.",
        ],
        tweak: transaction,
    },
    Scenario {
        name: "copy",
        about: &[
            "COPY: FROM STDIN by a simple Query (CopyData in three writes, CopyDone); FROM STDIN",
            "by the extended protocol with a Sync right after the Execute and another after",
            "CopyDone, as pgjdbc does; TO STDOUT; FROM STDIN ended by CopyFail; FROM STDIN failed by",
            "the server on a bad row, the client's CopyData and CopyDone after the error dropped by",
            "the server unanswered.",
        ],
        tweak: transaction,
    },
    Scenario {
        name: "portal_suspended",
        about: &[
            "In a BEGIN block: Execute with max_rows 3 (PortalSuspended), again ended by Flush,",
            "again to the end; then COMMIT.",
        ],
        tweak: transaction,
    },
    Scenario {
        name: "flush",
        about: &[
            "Parse/Describe/Flush answered before any Sync, then Bind/Execute/Sync; unnamed, then",
            "with a named statement.",
        ],
        tweak: transaction,
    },
    Scenario {
        name: "evicted_reprepared",
        about: &[
            "max_prepared_statements = 2: three named statements prepared (the third evicts the",
            "first: Sluice closes it on the server), then each used again, so Sluice closes the",
            "least recently used and prepares the one used, swallowing the answers to both; a",
            "statement closed and parsed again.",
        ],
        tweak: |c| c.max_prepared_statements = 2,
    },
    Scenario {
        name: "deallocate_discard",
        about: &[
            "Named statements, then DEALLOCATE s1 (answered by Sluice), use of s1 and s2,",
            "DEALLOCATE of an unknown name (the server's error), DEALLOCATE ALL, DISCARD ALL, and",
            "use and re-preparation of statements after each.",
        ],
        tweak: transaction,
    },
    Scenario {
        name: "session_state_reject",
        about: &[
            "on_session_state = reject: a session SET and a LISTEN by simple Query and a named",
            "Parse of a SET, each refused by Sluice itself (the Parse's batch dropped up to its",
            "Sync); SET LOCAL in a block (allowed); then a normal query.",
        ],
        tweak: |c| c.on_session_state = OnSessionState::Reject,
    },
    Scenario {
        name: "session_state_pin",
        about: &[
            "Default pinning: a session SET outside a block pins the client to its server, which",
            "it keeps for the simple and extended requests and the block that follow.",
        ],
        tweak: transaction,
    },
    Scenario {
        name: "session_pooling",
        about: &[
            "pool_mode = session: simple and extended requests, a named statement, its Close and",
            "a SET, all passed through unchanged (no rewriting).",
        ],
        tweak: |c| c.pool_mode = PoolMode::Session,
    },
    Scenario {
        name: "large_message",
        about: &[
            "In a BEGIN block: a Query of about 300 KB written in 64 KB parts, a CopyData of 100 KB",
            "likewise, and a result of about 1 MB of DataRows (one of them 100 KB); then COMMIT.",
        ],
        tweak: transaction,
    },
];

/// Where the fixtures go.
fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/relay/fixtures")
}

/// The configuration keys a fixture states, as the configuration file writes them.
const KEYS: &[&str] = &[
    "pool_mode",
    "on_session_state",
    "max_prepared_statements",
    "pool_size",
    "max_message_bytes",
];

fn settings(cfg: &Config) -> Vec<(String, String)> {
    let table = toml::Value::try_from(cfg).unwrap();
    KEYS.iter()
        .map(|k| {
            let v = match &table[*k] {
                toml::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.to_string(), v)
        })
        .collect()
}

/// One capture of `s`, against a fresh PostgreSQL and Sluice: the fixture's text.
async fn capture(s: &Scenario) -> String {
    let pg = start_pg_with_user(PgOptions::default(), USER, PASSWORD, DB).await;
    let version = {
        let c = direct(&pg.url(USER, PASSWORD, DB)).await;
        within("setup", c.batch_execute(SETUP)).await.unwrap();
        let rows = within("version", c.simple_query("SHOW server_version"))
            .await
            .unwrap();
        rows.iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .unwrap()
    };
    let server: SocketAddr = format!("{}:{}", pg.host(), pg.port()).parse().unwrap();
    let mut rec = Recorder::start(server).await;
    let overrides = Overrides {
        upstream: Some(format!(
            "postgres://{USER}:{PASSWORD}@{}/{DB}",
            rec.server_side()
        )),
        listen: Some("127.0.0.1:0".parse().unwrap()),
        admin_listen: Some("127.0.0.1:0".parse().unwrap()),
        max_server_connections: Some(2),
        pool_size: Some(1),
    };
    let mut cfg = Config::load(None, &overrides).unwrap();
    cfg.server_tls = ServerTls::Disable;
    (s.tweak)(&mut cfg);
    let settings = settings(&cfg);
    let sluice = sluice::start(cfg).await.unwrap();
    let front = rec.serve_clients(sluice.local_addr);
    let tap = rec.tap();

    let (raw, _, _) = Raw::login(front, false, USER, PASSWORD, DB).await;
    tap.settle().await;
    rec.start_recording();
    let mut client = scenarios::Client::new(raw, tap.clone());
    scenarios::run(s.name, &mut client).await;
    client.terminate().await;
    tap.settle().await;
    // Whatever Sluice does after the Terminate (its clean-up of the server) is over by now.
    tokio::time::sleep(recorder::quiet() * 4).await;
    let mut recording = rec.finish();
    sluice.stop().await;
    drop(pg);

    assert!(recording.terminated, "{}: no Terminate recorded", s.name);
    let sides: Vec<bool> = recording
        .connections
        .iter()
        .map(|(back, _)| *back)
        .collect();
    assert_eq!(
        sides,
        [false, true],
        "{}: one client and one server connection",
        s.name
    );
    assert!(
        recording.after.iter().all(|c| c.dir != Dir::ClientOut),
        "{}: Sluice wrote to the client after its Terminate",
        s.name
    );
    let statements = normalise_statement_names(&mut recording.chunks);
    check(&recording.chunks).unwrap_or_else(|e| panic!("{}: {e}", s.name));

    let mut about: Vec<String> = s.about.iter().map(|l| l.to_string()).collect();
    about.push(String::new());
    about.push(format!(
        "Captured through Sluice (one server connection) in front of PostgreSQL {version}, by"
    ));
    about.push(format!("  {COMMAND}"));
    about.push(format!(
        "Chunks: reads of at most {CHUNK} bytes, taken one at a time once nothing moves (README.md)."
    ));
    if statements > 0 {
        about.push(format!(
            "Server statement names: sluice_ and 16 hex digits numbering the statements ({statements})"
        ));
        about.push(
            "in order of first appearance; Sluice names them by a hash keyed anew in every process."
                .to_owned(),
        );
    }
    let after = summary(&recording.after, Dir::ServerOut);
    if !after.is_empty() {
        about.push(
            "Not recorded: after the client's Terminate, outside the relay, Sluice sent the server"
                .to_owned(),
        );
        about.push(format!("  {}", after.join(", ")));
    }
    render(&about, &settings, &recording.chunks)
}

/// Where two texts first differ, for the failure message.
fn first_difference(a: &str, b: &str) -> String {
    let line = a
        .lines()
        .zip(b.lines())
        .position(|(x, y)| x != y)
        .unwrap_or_else(|| a.lines().count().min(b.lines().count()));
    let show = |t: &str| {
        t.lines()
            .nth(line)
            .map(|l| l.chars().take(160).collect::<String>())
            .unwrap_or_else(|| "(end)".into())
    };
    format!(
        "line {}:\n  first:  {}\n  second: {}",
        line + 1,
        show(a),
        show(b)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "regenerates proxy/src/relay/fixtures; run it on its own (see the module docs)"]
async fn relay_capture() {
    let only = std::env::var("RELAY_CAPTURE_ONLY").ok();
    let wanted = |name: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|w| w.trim() == name))
    };
    let dir = fixtures_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let mut done = 0;
    for s in SCENARIOS.iter().filter(|s| wanted(s.name)) {
        let first = capture(s).await;
        let second = capture(s).await;
        assert!(
            first == second,
            "{}: two captures differ at {}",
            s.name,
            first_difference(&first, &second)
        );
        let path = dir.join(format!("{}.txt", s.name));
        std::fs::write(&path, &first).unwrap();
        let chunks = first.lines().filter(|l| !l.starts_with(['#', '@'])).count();
        println!("{}: {chunks} chunks, {} bytes", path.display(), first.len());
        done += 1;
    }
    assert!(done > 0, "no scenario matches RELAY_CAPTURE_ONLY={only:?}");
}
