//! COPY through Sluice: in and out, and an error while a CopyData message is half sent.

use super::*;

// ---------------------------------------------------------------------------------------------
// 3. COPY.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out() {
    let env = env(4, 2, |_| {}).await;
    env.setup("CREATE TABLE c (id int8, s text)").await;
    let c = env.client().await;
    const N: i64 = 100_000;

    // COPY FROM STDIN, 100,000 rows in chunks.
    let sink = within("copy_in", c.copy_in("COPY c FROM STDIN"))
        .await
        .expect("copy_in");
    futures_util::pin_mut!(sink);
    for start in (0..N).step_by(5_000) {
        let chunk = Bytes::from(copy_rows(start..start + 5_000));
        within("copy chunk", sink.send(chunk))
            .await
            .expect("send chunk");
    }
    let n = within("copy finish", sink.finish())
        .await
        .expect("COPY FROM STDIN");
    assert_eq!(n, N as u64);

    // COPY TO STDOUT, all of it, in order.
    let stream = within(
        "copy_out",
        c.copy_out("COPY (SELECT * FROM c ORDER BY id) TO STDOUT"),
    )
    .await
    .expect("copy_out");
    let chunks: Vec<Bytes> = within("copy out data", stream.try_collect())
        .await
        .expect("COPY TO STDOUT");
    let out: Vec<u8> = chunks.concat();
    assert_eq!(out.len(), copy_rows(0..N).len());
    assert!(out == copy_rows(0..N).as_bytes(), "COPY TO STDOUT content");

    // CopyFail: a copy abandoned by dropping the sink is rolled back and the connection works.
    {
        let sink = within("copy_in 2", c.copy_in::<_, Bytes>("COPY c FROM STDIN"))
            .await
            .expect("copy_in");
        futures_util::pin_mut!(sink);
        within("send", sink.send(Bytes::from(copy_rows(0..1000))))
            .await
            .expect("send");
    }
    assert_eq!(
        scalar(&c, "SELECT count(*) FROM c").await,
        N.to_string(),
        "abandoned copy wrote nothing"
    );

    // A bad row halfway: the server's error comes back, nothing is written, the connection works.
    let sink = within("copy_in 3", c.copy_in("COPY c FROM STDIN"))
        .await
        .expect("copy_in");
    futures_util::pin_mut!(sink);
    let mut data = copy_rows(0..50_000);
    data.push_str("not-a-number\tbad\n");
    data.push_str(&copy_rows(50_000..60_000));
    let sent = within("send", sink.send(Bytes::from(data))).await;
    let finished = match sent {
        Ok(()) => within("finish", sink.finish()).await,
        Err(e) => Err(e),
    };
    let e = finished.expect_err("bad row rejected");
    assert_eq!(code(&e), "22P02");
    assert_eq!(scalar(&c, "SELECT count(*) FROM c").await, N.to_string());
    assert_eq!(scalar(&c, "SELECT 1").await, "1");
}

/// A simple-query COPY FROM STDIN rejected by the server while the client is in the middle of
/// sending a CopyData message. PostgreSQL answers ErrorResponse and ReadyForQuery after the first
/// (bad) message, then reads and ignores the rest of the client's copy stream. Sluice must not
/// hand the server to someone else while the client's message is cut in two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_error_while_a_copy_data_message_is_half_sent() {
    let env = env(1, 1, |c| c.wait_timeout = Duration::from_secs(30)).await;
    env.setup("CREATE TABLE n (a int)").await;

    // Message 2 announces 64 KiB of rows; only its first 100 bytes come at first.
    let body: Vec<u8> = b"2\n".repeat(32 * 1024);
    let mut head = BytesMut::new();
    copy_data(b"not-a-number\n", &mut head);
    head.put_u8(b'd');
    head.put_u32(4 + body.len() as u32);
    head.put_slice(&body[..100]);
    let mut tail = BytesMut::from(&body[100..]);
    frontend::copy_done(&mut tail);
    frontend::query("SELECT 2", &mut tail).expect("encode");

    // Another client, logged in (and its startup settings validated) before the copy starts.
    let mut other = Some(env.client().await);
    // Directly first (what PostgreSQL does: the error, then the rest of the copy stream is
    // read and ignored and SELECT 2 runs), then through Sluice.
    for through_sluice in [false, true] {
        let mut c = if through_sluice {
            Raw::login(env.addr(), false, USER, PASSWORD, DB).await.0
        } else {
            direct_raw(env.pg.port()).await
        };
        let mut q = BytesMut::new();
        frontend::query("COPY n FROM STDIN", &mut q).expect("encode");
        c.send(&q).await;
        assert_eq!(c.recv().await.0, b'G', "CopyInResponse");
        c.send(&head).await;
        let m = c.until_ready().await;
        assert_eq!(error_code(&m).as_deref(), Some("22P02"), "{m:?}");

        if through_sluice {
            // The other client now needs the only server connection.
            let other = other.take().expect("other client");
            let other_query =
                tokio::spawn(async move { other.simple_query("SELECT 1").await.map(|_| ()) });
            tokio::time::sleep(Duration::from_millis(200)).await;
            c.send(&tail).await;
            let (m, end) = within_for(
                Duration::from_secs(15),
                "SELECT 2 after the copy",
                c.until_ready_or_end(),
            )
            .await;
            let other = tokio::time::timeout(Duration::from_secs(10), other_query)
                .await
                .map(|r| r.expect("task").map_err(|e| describe(&e)));
            assert!(
                end.is_none()
                    && rows(&m) == vec![vec![Some("2".to_owned())]]
                    && matches!(other, Ok(Ok(()))),
                "the copying client expected the result of SELECT 2 and got {:?} then {end:?}; \
                 the other client's SELECT 1 gave {other:?} (Err(Elapsed) = still waiting after 10 s)",
                m.iter()
                    .map(|(t, b)| (*t as char, String::from_utf8_lossy(b).into_owned()))
                    .collect::<Vec<_>>()
            );
        } else {
            c.send(&tail).await;
            let m = c.until_ready().await;
            assert_eq!(rows(&m), vec![vec![Some("2".to_owned())]], "{m:?}");
        }
    }
}

/// A raw client logged in straight to PostgreSQL as the test user.
async fn direct_raw(port: u16) -> Raw {
    Raw::login(
        SocketAddr::from(([127, 0, 0, 1], port)),
        false,
        USER,
        PASSWORD,
        DB,
    )
    .await
    .0
}
