//! Resets: the core fed bytes directly (a client with startup settings, answers built as
//! PostgreSQL sends them).

use super::*;
use crate::protocol::backend::Out;
use crate::sql::resets::Reset;

fn startup() -> Settings {
    [
        ("application_name".to_string(), "app_a".to_string()),
        ("timezone".to_string(), "Asia/Tokyo".to_string()),
    ]
    .into()
}

fn query(sql: &str) -> BytesMut {
    let mut b = BytesMut::new();
    Out::query(&mut b, sql);
    b
}

/// What the core sends the server for the client's `bytes` (all walked).
fn to_server(core: &mut Core<'_>, bytes: &[u8]) -> Vec<u8> {
    let w = core.client(bytes).expect("client walk");
    assert_eq!(w.used, bytes.len(), "the whole request is walked");
    if w.staged {
        core.staged_for_server().to_vec()
    } else {
        bytes[..w.used].to_vec()
    }
}

/// What the core sends the client for the server's `bytes`, one byte at a time as well as
/// whole (the outputs must agree); and whether the server is releasable after.
fn to_client(core: &mut Core<'_>, bytes: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = BytesMut::new();
    let mut ready = false;
    for b in bytes {
        buf.extend_from_slice(&[*b]);
        let w = core.server(&buf).expect("server walk");
        out.extend_from_slice(if w.staged {
            core.staged_for_client()
        } else {
            &buf[..w.used]
        });
        buf.advance(w.used);
        ready |= w.ready;
    }
    assert!(buf.is_empty());
    (out, ready && core.releasable())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The server's answer to Sluice's statement.
fn own_answer(out: &mut BytesMut, values: &[&str]) {
    let mut cols = vec![("sluice.reset", false)];
    cols.extend(values.iter().skip(1).map(|_| ("set_config", false)));
    Out::row_description(out, &cols);
    let values: Vec<Option<&str>> = values.iter().map(|v| Some(*v)).collect();
    Out::data_row(out, &values);
    Out::command_complete(out, "SELECT 1");
}

struct Parts {
    flow: Flow,
    client: ClientStatements,
    on_server: ServerStatements,
    hasher: RandomState,
    startup: Settings,
}

impl Parts {
    fn new() -> Self {
        Parts {
            flow: Flow::new(),
            client: ClientStatements::default(),
            on_server: ServerStatements::with_capacity(10),
            hasher: RandomState::new(),
            startup: startup(),
        }
    }

    fn core(&mut self, pooling: bool) -> Core<'_> {
        let statements = pooling.then_some(Statements {
            client: &mut self.client,
            hasher: &self.hasher,
            reject_session_state: false,
        });
        Core::new(
            &mut self.flow,
            1 << 20,
            statements,
            &mut self.on_server,
            &self.startup,
        )
    }
}

#[test]
fn reset_all_puts_the_startup_values_back_in_the_same_query() {
    for pooling in [true, false] {
        let mut p = Parts::new();
        let mut core = p.core(pooling);
        let sql = "SET application_name = 'x'; RESET ALL; SHOW application_name";
        let sent = text(&to_server(&mut core, &query(sql)));
        assert!(
            sent.contains(
                "RESET ALL;SELECT set_config('application_name', 'app_a', false) AS \
                 \"sluice.reset\", set_config('timezone', 'Asia/Tokyo', false); SHOW"
            ),
            "{sent}"
        );
        let mut s = BytesMut::new();
        Out::command_complete(&mut s, "SET");
        Out::command_complete(&mut s, "RESET");
        own_answer(&mut s, &["app_a", "Asia/Tokyo"]);
        Out::row_description(&mut s, &[("application_name", false)]);
        Out::data_row(&mut s, &[Some("app_a")]);
        Out::command_complete(&mut s, "SHOW");
        Out::ready_for_query(&mut s, TxStatus::Idle);
        let (got, released) = to_client(&mut core, &s);
        // Everything but Sluice's statement's answer, as the server sent it.
        assert_eq!(tags(&got), "CCTDCZ");
        assert!(!text(&got).contains("sluice.reset"));
        assert!(released || !pooling);
        drop(core);
        assert_eq!(p.flow.resets, [Reset::All]);
        assert!(!p.flow.resets_unsure);
        assert_eq!(
            p.flow.pinned(),
            None,
            "a SET undone by RESET ALL does not pin"
        );
    }
}

#[test]
fn reset_name_restores_only_that_startup_value() {
    let mut p = Parts::new();
    let mut core = p.core(true);
    let sent = text(&to_server(&mut core, &query("RESET TimeZone")));
    assert!(
        sent.contains(
            "RESET TimeZone\n;SELECT set_config('timezone', 'Asia/Tokyo', false) AS \"sluice.reset\"\0"
        ),
        "{sent:?}"
    );
    let mut s = BytesMut::new();
    Out::command_complete(&mut s, "RESET");
    Out::parameter_status(&mut s, "TimeZone", "UTC");
    own_answer(&mut s, &["Asia/Tokyo"]);
    Out::parameter_status(&mut s, "TimeZone", "Asia/Tokyo");
    Out::ready_for_query(&mut s, TxStatus::Idle);
    let (got, released) = to_client(&mut core, &s);
    // ParameterStatus messages are the server's: from PostgreSQL 14 they come only before
    // ReadyForQuery, here as if from an older server, passed as they are.
    assert_eq!(tags(&got), "CSSZ");
    assert!(released);
    drop(core);
    assert_eq!(p.flow.resets, [Reset::Name("timezone".into())]);

    // A setting the client did not give at startup is the server's default already.
    let mut p = Parts::new();
    let mut core = p.core(true);
    let q = query("SET work_mem TO DEFAULT");
    assert_eq!(to_server(&mut core, &q), q.to_vec());
    drop(core);
    assert_eq!(p.flow.resets, [Reset::Name("work_mem".into())]);
    assert_eq!(p.flow.pinned(), None);
}

/// The server's answer to a converted `DISCARD ALL` and Sluice's statement after it, up to
/// its ReadyForQuery.
fn discard_all_answer(s: &mut BytesMut) {
    s.extend_from_slice(&[be::PARSE_COMPLETE, 0, 0, 0, 4]);
    s.extend_from_slice(&[be::BIND_COMPLETE, 0, 0, 0, 4]);
    Out::command_complete(s, "DISCARD ALL");
    s.extend_from_slice(&[be::PARSE_COMPLETE, 0, 0, 0, 4]);
    s.extend_from_slice(&[be::BIND_COMPLETE, 0, 0, 0, 4]);
    own_answer(s, &["app_a", "Asia/Tokyo"]);
}

#[test]
fn discard_all_runs_first_in_an_extended_request() {
    for pooling in [true, false] {
        let mut p = Parts::new();
        let mut core = p.core(pooling);
        let sent = to_server(&mut core, &query("DISCARD ALL"));
        assert_eq!(tags(&sent), "PBEPBDES");
        assert!(text(&sent).contains("\0DISCARD ALL\0"));
        let mut s = BytesMut::new();
        discard_all_answer(&mut s);
        Out::ready_for_query(&mut s, TxStatus::Idle);
        let (got, released) = to_client(&mut core, &s);
        assert_eq!(tags(&got), "CZ");
        assert!(released || !pooling);
        drop(core);
        assert_eq!(p.flow.resets, [Reset::All]);
    }
}

#[test]
fn discard_all_refused_in_a_block_reaches_the_client() {
    let mut p = Parts::new();
    p.flow.status = TxStatus::InTransaction;
    let mut core = p.core(true);
    to_server(&mut core, &query("DISCARD ALL"));
    let mut s = BytesMut::new();
    s.extend_from_slice(&[be::PARSE_COMPLETE, 0, 0, 0, 4]);
    s.extend_from_slice(&[be::BIND_COMPLETE, 0, 0, 0, 4]);
    PgError::error(
        crate::error::sqlstate::FEATURE_NOT_SUPPORTED,
        "DISCARD ALL cannot run inside a transaction block",
    )
    .encode(&mut s);
    Out::ready_for_query(&mut s, TxStatus::Failed);
    let (got, _) = to_client(&mut core, &s);
    assert_eq!(tags(&got), "EZ");
    drop(core);
    assert!(p.flow.resets_unsure, "the session reads its settings back");
}

#[test]
fn a_later_request_answers_are_the_clients() {
    // A Query behind the reset, in the same write: its ParseComplete-free answers and a
    // column that only looks like Sluice's are passed; Sluice's statement is recognised
    // by its first column only.
    let mut p = Parts::new();
    let mut core = p.core(true);
    let mut c = query("DISCARD ALL");
    c.extend_from_slice(&query("SELECT 1 AS x"));
    let sent = to_server(&mut core, &c);
    assert_eq!(tags(&sent), "PBEPBDESQ");
    let mut s = BytesMut::new();
    discard_all_answer(&mut s);
    Out::ready_for_query(&mut s, TxStatus::Idle);
    Out::row_description(&mut s, &[("x", false), ("sluice.reset", false)]);
    Out::data_row(&mut s, &[Some("1"), Some("2")]);
    Out::command_complete(&mut s, "SELECT 1");
    Out::ready_for_query(&mut s, TxStatus::Idle);
    let (got, released) = to_client(&mut core, &s);
    assert_eq!(tags(&got), "CZTDCZ");
    assert!(released);
    drop(core);
    assert_eq!(p.flow.resets, [Reset::All]);
    assert!(
        !p.flow.resets_unsure,
        "it ran alone, outside a block, and succeeded"
    );
}

#[test]
fn resets_no_longer_pin_and_other_state_still_does() {
    for (sql, pin) in [
        ("RESET ALL", None),
        ("RESET search_path", None),
        ("SET search_path = x; RESET search_path", None),
        ("SET search_path = x; RESET work_mem", Some(Pin::Set)),
        ("RESET ALL; LISTEN c", Some(Pin::Listen)),
        ("RESET ROLE", Some(Pin::Set)),
    ] {
        let mut p = Parts::new();
        let mut core = p.core(true);
        to_server(&mut core, &query(sql));
        drop(core);
        assert_eq!(p.flow.pinned(), pin, "{sql}");
    }
}

#[test]
fn no_startup_settings_no_rewrite() {
    let mut p = Parts::new();
    p.startup = Settings::new();
    let mut core = p.core(true);
    let q = query("DISCARD ALL");
    assert_eq!(to_server(&mut core, &q), q.to_vec());
    drop(core);
    assert_eq!(p.flow.resets, [Reset::All]);
}
