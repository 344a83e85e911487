//! `proxy_protocol = true`: behind a load balancer that sends the PROXY protocol v2 header (an
//! AWS NLB with proxy protocol v2 on its target group), Sluice takes the client's address from
//! it; a connection that does not open with one is refused with a protocol violation.

use std::net::SocketAddr;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::pg::PgServer;
use crate::proxy::start_sluice;
use crate::support::{describe, start_pg_with_user, within_secs};

const USER: &str = "pp_app";
const PASSWORD: &str = "pp-pw";
const DB: &str = "pp_db";

/// A PROXY v2 header for a TCP-over-IPv4 client `from` reaching `to`, with the TLV an NLB adds
/// (0xEA: the VPC endpoint id).
fn header(from: SocketAddr, to: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(from), SocketAddr::V4(to)) = (from, to) else {
        panic!("IPv4 only here");
    };
    let tlv = [0xEA, 0x00, 0x04, 0x01, b'v', b'p', b'e'];
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11]);
    h.extend_from_slice(&((12 + tlv.len()) as u16).to_be_bytes());
    h.extend_from_slice(&from.ip().octets());
    h.extend_from_slice(&to.ip().octets());
    h.extend_from_slice(&from.port().to_be_bytes());
    h.extend_from_slice(&to.port().to_be_bytes());
    h.extend_from_slice(&tlv);
    h
}

/// A load balancer in front of `target`: each connection is sent on with a header naming
/// `client` as its source. Returns its address.
async fn balancer(target: SocketAddr, client: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut out) = TcpStream::connect(target).await else {
                    return;
                };
                if out.write_all(&header(client, target)).await.is_err() {
                    return;
                }
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
            });
        }
    });
    addr
}

async fn server() -> PgServer {
    start_pg_with_user(Default::default(), USER, PASSWORD, DB).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_address_comes_from_the_load_balancers_header() {
    let pg = server().await;
    let h = start_sluice(&pg, USER, PASSWORD, DB, 2, 2, |c| c.proxy_protocol = true).await;
    let client: SocketAddr = "203.0.113.7:51234".parse().expect("addr");
    let lb = balancer(h.local_addr, client).await;
    let url = format!(
        "postgres://{USER}:{PASSWORD}@{}:{}/{DB}",
        lb.ip(),
        lb.port()
    );
    let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("through the balancer: {}", describe(&e)));
    tokio::spawn(conn);
    let rows = c.simple_query("SELECT 1").await.expect("query");
    assert!(!rows.is_empty());
    let addrs: Vec<Option<SocketAddr>> = h
        .context
        .clients
        .snapshot()
        .iter()
        .map(|(_, slot)| slot.addr)
        .collect();
    assert_eq!(addrs, vec![Some(client)], "SHOW CLIENTS' address");

    // Straight to Sluice, with no header: refused, saying why.
    let direct = format!(
        "postgres://{USER}:{PASSWORD}@127.0.0.1:{}/{DB}",
        h.local_addr.port()
    );
    let err = within_secs(10, "a direct client is refused", async {
        tokio_postgres::connect(&direct, tokio_postgres::NoTls)
            .await
            .err()
            .expect("refused")
    })
    .await;
    assert_eq!(
        err.code().map(|c| c.code()),
        Some("08P01"),
        "{}",
        describe(&err)
    );
    assert!(
        describe(&err).contains("PROXY protocol v2 header"),
        "{}",
        describe(&err)
    );
    h.stop().await;
}
