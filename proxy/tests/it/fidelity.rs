//! Protocol fidelity: the same messages sent straight to PostgreSQL and through Sluice (in
//! transaction pooling, where Sluice renames prepared statements) get the same answers, message
//! for message, error texts included.

use std::net::SocketAddr;

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use postgres_protocol::IsNull;

use crate::proxy::start_sluice;
use crate::support::raw::{seen, Raw};
use crate::support::{direct_addr, start_pg_with_user};

const USER: &str = "fidelity_app";
const PASSWORD: &str = "fidelity-pw";
const DB: &str = "fidelity_db";

/// One request: messages up to a Sync.
type Step = BytesMut;

async fn run(addr: SocketAddr, steps: &[Step]) -> Vec<Vec<String>> {
    let (mut c, _, _) = Raw::login(addr, false, USER, PASSWORD, DB).await;
    let mut out = Vec::new();
    for step in steps {
        c.send(step).await;
        out.push(seen(&c.until_ready().await));
    }
    out
}

fn parse(b: &mut BytesMut, name: &str, sql: &str) {
    frontend::parse(name, sql, std::iter::empty(), b).expect("encode");
}

fn bind(b: &mut BytesMut, stmt: &str, params: &[i32]) {
    frontend::bind(
        "",
        stmt,
        std::iter::empty::<i16>(),
        params.iter(),
        |v, buf| {
            buf.extend_from_slice(v.to_string().as_bytes());
            Ok::<_, Box<dyn std::error::Error + Sync + Send>>(IsNull::No)
        },
        Some(0),
        b,
    )
    .map_err(|_| "bind")
    .expect("encode");
}

fn execute_sync(b: &mut BytesMut) {
    frontend::execute("", 0, b).expect("encode");
    frontend::sync(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_errors_name_the_clients_statements() {
    let pg = start_pg_with_user(Default::default(), USER, PASSWORD, DB).await;
    let sluice = start_sluice(&pg, USER, PASSWORD, DB, 4, 2, |_| {}).await;
    let direct = direct_addr(&pg);

    let mut steps = Vec::new();
    // A named statement, then the same name parsed again without a Close: PostgreSQL refuses
    // the second Parse (42P05) and skips the rest of the batch.
    let mut b = BytesMut::new();
    parse(&mut b, "s1", "SELECT 1");
    frontend::sync(&mut b);
    steps.push(b);
    for sql in ["SELECT 2", "SELECT 1"] {
        let mut b = BytesMut::new();
        parse(&mut b, "s1", sql);
        bind(&mut b, "s1", &[]);
        execute_sync(&mut b);
        steps.push(b);
    }
    // The first definition is still the one in force.
    let mut b = BytesMut::new();
    bind(&mut b, "s1", &[]);
    execute_sync(&mut b);
    steps.push(b);
    // A Bind with the wrong number of parameters: the error names the statement.
    let mut b = BytesMut::new();
    parse(&mut b, "two", "SELECT $1::int + $2::int");
    frontend::sync(&mut b);
    steps.push(b);
    let mut b = BytesMut::new();
    bind(&mut b, "two", &[1]);
    execute_sync(&mut b);
    steps.push(b);
    let mut b = BytesMut::new();
    bind(&mut b, "two", &[1, 2]);
    execute_sync(&mut b);
    steps.push(b);
    // Unknown names are the server's to report, as the client spelled them.
    let mut b = BytesMut::new();
    bind(&mut b, "nope", &[]);
    execute_sync(&mut b);
    steps.push(b);
    // Closed, then parsed again: allowed.
    let mut b = BytesMut::new();
    frontend::close(b'S', "s1", &mut b).expect("encode");
    parse(&mut b, "s1", "SELECT 3");
    bind(&mut b, "s1", &[]);
    execute_sync(&mut b);
    steps.push(b);

    let want = run(direct, &steps).await;
    let got = run(sluice.local_addr, &steps).await;
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_eq!(
            g, w,
            "step {i}: through Sluice (left) and directly (right) differ"
        );
    }
    assert_eq!(got.len(), want.len());
    // The checks above would pass on two identical mistakes: pin what PostgreSQL says.
    assert!(
        want[1].iter().any(|m| m.contains("C=42P05")),
        "{:?}",
        want[1]
    );
    assert!(
        want[5].iter().any(|m| m.contains("\"two\"")),
        "{:?}",
        want[5]
    );
}
