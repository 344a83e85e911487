//! Cancel, authentication and start-up errors, and raw protocol corner cases.

use super::*;

// ---------------------------------------------------------------------------------------------
// 5. Cancel.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_running_query_and_ignore_idle_cancel() {
    let env = env(4, 2, |_| {}).await;
    let c = Arc::new(env.client().await);
    let token = c.cancel_token();

    let running = {
        let c = c.clone();
        tokio::spawn(async move { c.simple_query("SELECT pg_sleep(30)").await.map(|_| ()) })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    within("cancel", token.cancel_query(NoTls))
        .await
        .expect("cancel request sent");
    let r = within_for(Duration::from_secs(15), "cancelled query ends", running)
        .await
        .expect("task");
    let e = r.expect_err("query cancelled");
    assert_eq!(code(&e), "57014", "{e}");
    assert_eq!(scalar(&c, "SELECT 'after cancel'").await, "after cancel");

    // A cancel for an idle client is ignored: neither its next query nor another client's
    // running query is hit by it.
    let other = Arc::new(env.client().await);
    let other_running = {
        let other = other.clone();
        tokio::spawn(async move { other.simple_query("SELECT pg_sleep(1)").await.map(|_| ()) })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    within("idle cancel", token.cancel_query(NoTls))
        .await
        .expect("cancel request sent");
    tokio::time::sleep(Duration::from_millis(200)).await;
    within(
        "query after idle cancel",
        c.simple_query("SELECT pg_sleep(0.5)"),
    )
    .await
    .expect("a cancel sent while idle does not hit the next query");
    within("other client", other_running)
        .await
        .expect("task")
        .expect("another client's query is not cancelled");

    // A cancel with the wrong secret does nothing.
    let (mut raw, pid, secret) = Raw::login(env.addr(), false, USER, PASSWORD, DB).await;
    let mut q = BytesMut::new();
    frontend::query("SELECT pg_sleep(1), 'done'", &mut q).expect("encode");
    raw.send(&q).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut cancel = Raw::connect(env.addr()).await;
    let mut b = BytesMut::new();
    frontend::cancel_request(pid, secret.wrapping_add(1), &mut b);
    cancel.send(&b).await;
    assert!(
        cancel.until_eof().await.is_empty(),
        "no answer to a CancelRequest"
    );
    let m = raw.until_ready().await;
    assert_eq!(error_code(&m), None, "{m:?}");
    assert_eq!(rows(&m)[0][1].as_deref(), Some("done"));
}

// ---------------------------------------------------------------------------------------------
// 6. Authentication and start-up errors.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_failures_and_malformed_startup() {
    let env = env(4, 2, |_| {}).await;
    let port = env.addr().port();
    let try_login = |user: &'static str, pw: &'static str, db: &'static str| async move {
        let s = format!("host=127.0.0.1 port={port} user={user} password={pw} dbname={db}");
        match within("login", tokio_postgres::connect(&s, NoTls)).await {
            Ok(_) => panic!("login as {user}/{db} should fail"),
            Err(e) => {
                let db_err = e
                    .as_db_error()
                    .unwrap_or_else(|| panic!("expected an ErrorResponse, got {e}"));
                (
                    db_err.severity().to_owned(),
                    db_err.code().code().to_owned(),
                    db_err.message().to_owned(),
                )
            }
        }
    };

    let wrong = try_login(USER, "wrong-password", DB).await;
    assert_eq!(
        wrong,
        (
            "FATAL".to_owned(),
            "28P01".to_owned(),
            format!("password authentication failed for user \"{USER}\"")
        )
    );
    let unknown = try_login("nobody", "whatever", DB).await;
    assert_eq!(
        unknown,
        (
            "FATAL".to_owned(),
            "28P01".to_owned(),
            "password authentication failed for user \"nobody\"".to_owned()
        ),
        "unknown users fail like a wrong password"
    );
    let (_, code_db, _) = try_login(USER, PASSWORD, "no_such_db").await;
    assert_eq!(code_db, "3D000");
    // Which databases exist is told only to a client that authenticates: without the
    // password, an unknown database fails like a wrong password, as in PostgreSQL.
    for (user, password) in [(USER, "wrong-password"), ("nobody", "whatever")] {
        let (severity, code, _) = try_login(user, password, "no_such_db").await;
        assert_eq!(
            (severity.as_str(), code.as_str()),
            ("FATAL", "28P01"),
            "{user}"
        );
    }

    // Malformed start-up packets: FATAL 08P01, connection closed.
    let mut v2 = BytesMut::new();
    let params = b"user\0core_app\0\0";
    v2.put_u32(8 + params.len() as u32);
    v2.put_u32(0x0002_0000);
    v2.put_slice(params);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("length 3", vec![0, 0, 0, 3, 0, 3, 0, 0]),
        ("huge length", vec![0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0]),
        ("protocol 2.0", v2.to_vec()),
        ("HTTP", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("params without terminator", {
            let mut b = BytesMut::new();
            b.put_u32(8 + 8);
            b.put_u32(196_608);
            b.put_slice(b"user\0abc");
            b.to_vec()
        }),
    ];
    for (what, bytes) in cases {
        let mut raw = Raw::connect(env.addr()).await;
        raw.send(&bytes).await;
        let msgs = raw.until_eof().await;
        assert_eq!(tags(&msgs), "E", "{what}: {msgs:?}");
        let f = fields(&msgs[0].1);
        assert_eq!(
            f.get(&'C').map(String::as_str),
            Some("08P01"),
            "{what}: {f:?}"
        );
        assert_eq!(f.get(&'S').map(String::as_str), Some("FATAL"), "{what}");
    }
    // A client that connects and leaves without a word.
    drop(Raw::connect(env.addr()).await);
    // A message that is not a password during authentication.
    let mut raw = Raw::connect(env.addr()).await;
    let mut b = BytesMut::new();
    frontend::startup_message([("user", USER), ("database", DB)], &mut b).expect("encode");
    raw.send(&b).await;
    assert_eq!(raw.recv().await.0, b'R');
    b.clear();
    frontend::query("SELECT 1", &mut b).expect("encode");
    raw.send(&b).await;
    let msgs = raw.until_eof().await;
    assert_eq!(error_code(&msgs).as_deref(), Some("08P01"), "{msgs:?}");

    // Sluice keeps serving.
    let c = env.client().await;
    assert_eq!(scalar(&c, "SELECT 'alive'").await, "alive");
}

// ---------------------------------------------------------------------------------------------
// 7. Raw protocol corner cases.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_corner_cases() {
    let env = env(4, 2, |_| {}).await;
    let (mut c, _, _) = Raw::login(env.addr(), true, USER, PASSWORD, DB).await;
    let mut b = BytesMut::new();

    // (a) Parse + Describe + Flush: answers come before any Sync; then Bind/Execute/Sync.
    frontend::parse("", "SELECT $1::int4 + 1 AS n, 'x'::text AS t", [23], &mut b).expect("encode");
    frontend::describe(b'S', "", &mut b).expect("encode");
    frontend::flush(&mut b);
    c.send(&b).await;
    b.clear();
    let got: Vec<u8> = vec![c.recv().await.0, c.recv().await.0, c.recv().await.0];
    assert_eq!(
        got, b"1tT",
        "ParseComplete, ParameterDescription, RowDescription"
    );
    frontend::bind(
        "",
        "",
        [0],
        ["41"],
        |v, buf| {
            buf.put_slice(v.as_bytes());
            Ok(postgres_protocol::IsNull::No)
        },
        [0],
        &mut b,
    )
    .map_err(|_| "bind")
    .expect("encode");
    frontend::execute("", 0, &mut b).expect("encode");
    frontend::sync(&mut b);
    c.send(&b).await;
    b.clear();
    let m = c.until_ready().await;
    assert_eq!(tags(&m), "2DCZ");
    assert_eq!(
        rows(&m),
        vec![vec![Some("42".to_owned()), Some("x".to_owned())]]
    );

    // (b) Portal suspension inside a transaction: Execute with max 3 rows until done.
    assert_eq!(tags(&c.query("BEGIN").await), "CZ");
    frontend::parse("", "SELECT g FROM generate_series(1, 10) g", [], &mut b).expect("encode");
    frontend::bind(
        "p",
        "",
        [],
        Vec::<&str>::new(),
        |_, _| Ok(postgres_protocol::IsNull::No),
        [0],
        &mut b,
    )
    .map_err(|_| "bind")
    .expect("encode");
    frontend::flush(&mut b);
    c.send(&b).await;
    b.clear();
    assert_eq!((c.recv().await.0, c.recv().await.0), (b'1', b'2'));
    let mut seen = Vec::new();
    let mut suspended = 0;
    for round in 0.. {
        assert!(round < 10, "portal never completed");
        frontend::execute("p", 3, &mut b).expect("encode");
        // Alternate Flush and Sync: the portal survives a Sync inside a transaction block.
        if round % 2 == 0 {
            frontend::flush(&mut b);
        } else {
            frontend::sync(&mut b);
        }
        c.send(&b).await;
        b.clear();
        let mut end = None;
        while end.is_none() {
            let (tag, body) = c.recv().await;
            match tag {
                b'D' => seen.push(row_text(&body)[0].clone().expect("value")),
                b's' | b'C' => end = Some(tag),
                other => panic!("unexpected '{}'", other as char),
            }
        }
        if round % 2 == 1 {
            assert_eq!(c.recv().await.0, b'Z');
        }
        if end == Some(b's') {
            suspended += 1;
        } else {
            break;
        }
    }
    assert_eq!(suspended, 3);
    assert_eq!(
        seen,
        (1..=10).map(|i| i.to_string()).collect::<Vec<_>>(),
        "all rows, in order"
    );
    frontend::sync(&mut b);
    c.send(&b).await;
    b.clear();
    let z = c.until_ready().await;
    assert_eq!(z.last().expect("Z").1, b"T", "still in the transaction");
    assert_eq!(tags(&c.query("COMMIT").await), "CZ");

    // (c) An empty query string.
    assert_eq!(tags(&c.query("").await), "IZ");

    // (d) A notice.
    let m = c.query("DO $$ BEGIN RAISE NOTICE 'hi'; END $$").await;
    assert_eq!(tags(&m), "NCZ");
    assert_eq!(fields(&m[0].1).get(&'M').map(String::as_str), Some("hi"));

    // Errors in the extended protocol skip to Sync, and the connection goes on.
    frontend::parse("", "SELECT 1/0", [], &mut b).expect("encode");
    frontend::bind(
        "",
        "",
        [],
        Vec::<&str>::new(),
        |_, _| Ok(postgres_protocol::IsNull::No),
        [],
        &mut b,
    )
    .map_err(|_| "bind")
    .expect("encode");
    frontend::execute("", 0, &mut b).expect("encode");
    frontend::sync(&mut b);
    frontend::query("SELECT 'next'", &mut b).expect("encode");
    c.send(&b).await;
    b.clear();
    let m = c.until_ready().await;
    assert_eq!(error_code(&m).as_deref(), Some("22012"), "{m:?}");
    let m = c.until_ready().await;
    assert_eq!(rows(&m), vec![vec![Some("next".to_owned())]]);

    // The function-call protocol outside a transaction: int4pl(40, 2), text in and out.
    b.put_u8(b'F');
    let at = b.len();
    b.put_u32(0);
    b.put_u32(177); // pg_proc OID of int4pl
    b.put_i16(1);
    b.put_i16(0);
    b.put_i16(2);
    for arg in [&b"40"[..], &b"2"[..]] {
        b.put_i32(arg.len() as i32);
        b.put_slice(arg);
    }
    b.put_i16(0);
    let len = (b.len() - at) as u32;
    b[at..at + 4].copy_from_slice(&len.to_be_bytes());
    c.send(&b).await;
    b.clear();
    let m = c.until_ready().await;
    assert_eq!(tags(&m), "VZ", "{m:?}");
    assert_eq!(&m[0].1[4..], b"42", "FunctionCallResponse");
    assert_eq!(m[1].1, b"I");

    // A Terminate ends the session cleanly.
    frontend::terminate(&mut b);
    c.send(&b).await;
    assert!(c.until_eof().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_message_is_refused() {
    let env = env(4, 2, |c| c.max_message_bytes = 1 << 20).await;
    let bystander = env.client().await;
    let mut b = BytesMut::new();

    // A 2 MiB Query announced in its header: refused at once, before the body arrives.
    let (mut c, _, _) = Raw::login(env.addr(), false, USER, PASSWORD, DB).await;
    b.put_u8(b'Q');
    b.put_u32(4 + (2 << 20));
    b.put_slice(b"SELECT '");
    c.send(&b).await;
    b.clear();
    let m = c.until_eof().await;
    assert_eq!(tags(&m), "E", "{m:?}");
    assert_eq!(error_code(&m).as_deref(), Some("08P01"));

    // The whole 2 MiB sent: the client gets the error or a reset, never a hang.
    let (mut c, _, _) = Raw::login(env.addr(), false, USER, PASSWORD, DB).await;
    frontend::query(&format!("SELECT '{}'", "q".repeat(2 << 20)), &mut b).expect("encode");
    let (mut rd, mut wr) = c.stream.split();
    let bytes = b.split().freeze();
    let outcome = within("oversized query", async {
        let write = async {
            let _ = wr.write_all(&bytes).await;
        };
        let read = async {
            let mut all = Vec::new();
            let _ = rd.read_to_end(&mut all).await;
            all
        };
        let ((), all) = tokio::join!(write, read);
        all
    })
    .await;
    if !outcome.is_empty() {
        assert_eq!(outcome[0], b'E');
        assert!(
            outcome.windows(6).any(|w| w == b"C08P01"),
            "08P01 in {:?}",
            String::from_utf8_lossy(&outcome)
        );
    }
    // Inside a transaction, mid-relay: same refusal, and the transaction is rolled back.
    env.setup("CREATE TABLE m (a int)").await;
    let (mut c, _, _) = Raw::login(env.addr(), false, USER, PASSWORD, DB).await;
    assert_eq!(
        tags(&c.query("BEGIN; INSERT INTO m VALUES (1)").await),
        "CCZ"
    );
    b.put_u8(b'Q');
    b.put_u32(4 + (2 << 20));
    b.put_slice(b"SELECT '");
    c.send(&b).await;
    b.clear();
    let m = c.until_eof().await;
    assert_eq!(error_code(&m).as_deref(), Some("08P01"), "{m:?}");
    // Other clients are unaffected.
    assert_eq!(scalar(&bystander, "SELECT 'ok'").await, "ok");
    assert_eq!(scalar(&bystander, "SELECT count(*) FROM m").await, "0");
    // Just under the limit is fine.
    let q = format!("SELECT length('{}')", "a".repeat((1 << 20) - 100));
    assert_eq!(scalar(&bystander, &q).await, ((1 << 20) - 100).to_string());
}
