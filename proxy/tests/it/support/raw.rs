//! A raw protocol client, for what drivers never send: messages as (tag, body), start-up and
//! SCRAM-SHA-256 login, and helpers to read ErrorResponse fields and DataRow columns.

use std::collections::HashMap;
use std::net::SocketAddr;

use bytes::{BufMut, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::within;

pub type Msg = (u8, Vec<u8>);

pub struct Raw {
    pub stream: TcpStream,
    pub buf: BytesMut,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        let stream = within("TCP connect", TcpStream::connect(addr))
            .await
            .expect("TCP connect");
        stream.set_nodelay(true).expect("nodelay");
        Raw {
            stream,
            buf: BytesMut::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        within("send", self.stream.write_all(bytes))
            .await
            .expect("send");
    }

    /// The next message; `Ok(None)` at EOF.
    pub async fn try_recv(&mut self) -> std::io::Result<Option<Msg>> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
                let total = 1 + len as usize;
                if self.buf.len() >= total {
                    let m = self.buf.split_to(total);
                    return Ok(Some((m[0], m[5..].to_vec())));
                }
            }
            self.buf.reserve(64 * 1024);
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Ok(None);
            }
        }
    }

    pub async fn recv(&mut self) -> Msg {
        within("a message", self.try_recv())
            .await
            .expect("read")
            .expect("connection closed unexpectedly")
    }

    /// Messages up to and including the next ReadyForQuery.
    pub async fn until_ready(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        loop {
            let m = self.recv().await;
            let done = m.0 == b'Z';
            out.push(m);
            if done {
                return out;
            }
        }
    }

    /// Messages up to the next ReadyForQuery, or up to the end of the connection (bounded);
    /// the second value says how the connection ended, if it did.
    pub async fn until_ready_or_end(&mut self) -> (Vec<Msg>, Option<String>) {
        let mut out = Vec::new();
        let end = within("ReadyForQuery or the end of the connection", async {
            loop {
                match self.try_recv().await {
                    Ok(Some(m)) => {
                        let done = m.0 == b'Z';
                        out.push(m);
                        if done {
                            return None;
                        }
                    }
                    Ok(None) => return Some("EOF".to_owned()),
                    Err(e) => return Some(e.to_string()),
                }
            }
        })
        .await;
        (out, end)
    }

    /// Everything until the peer closes (bounded).
    pub async fn until_eof(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        within("the connection to close", async {
            while let Ok(Some(m)) = self.try_recv().await {
                out.push(m);
            }
        })
        .await;
        out
    }

    /// A Query of raw bytes (text in the session's client encoding), and its answer.
    pub async fn query_bytes(&mut self, sql: &[u8]) -> Vec<Msg> {
        let mut b = BytesMut::with_capacity(sql.len() + 6);
        b.extend_from_slice(b"Q");
        b.extend_from_slice(&u32::try_from(sql.len() + 5).expect("size").to_be_bytes());
        b.extend_from_slice(sql);
        b.extend_from_slice(b"\0");
        self.send(&b).await;
        self.until_ready().await
    }

    pub async fn query(&mut self, sql: &str) -> Vec<Msg> {
        let mut b = BytesMut::new();
        frontend::query(sql, &mut b).expect("encode");
        self.send(&b).await;
        self.until_ready().await
    }

    /// Adds to `b` the extended-protocol messages that run statement `name` (prepared first
    /// with `sql`, when given) into the unnamed portal: Parse, Bind, Describe, Execute. No Sync.
    pub fn put_run(b: &mut BytesMut, name: &str, sql: Option<&str>) {
        if let Some(sql) = sql {
            frontend::parse(name, sql, std::iter::empty(), b).expect("encode");
        }
        frontend::bind(
            "",
            name,
            std::iter::empty(),
            std::iter::empty::<()>(),
            |_, _| Ok(postgres_protocol::IsNull::No),
            std::iter::empty(),
            b,
        )
        .map_err(|_| ())
        .expect("encode");
        frontend::describe(b'P', "", b).expect("encode");
        frontend::execute("", 0, b).expect("encode");
    }

    /// `sql` through the extended protocol (the unnamed statement), and its answer.
    pub async fn extended(&mut self, sql: &str) -> Vec<Msg> {
        let mut b = BytesMut::new();
        Raw::put_run(&mut b, "", Some(sql));
        frontend::sync(&mut b);
        self.send(&b).await;
        self.until_ready().await
    }

    /// Start-up and SCRAM-SHA-256 login as `user` on `db`; returns the client and its cancel key.
    pub async fn login(
        addr: SocketAddr,
        ssl_probe: bool,
        user: &str,
        password: &str,
        db: &str,
    ) -> (Raw, i32, i32) {
        let (c, _, pid, secret) = Raw::login_with(addr, ssl_probe, user, password, db, &[]).await;
        (c, pid, secret)
    }

    /// Like [`Raw::login`], with more startup parameters (`application_name`, `options`, ...);
    /// also returns the login's ParameterStatus messages, in order.
    pub async fn login_with(
        addr: SocketAddr,
        ssl_probe: bool,
        user: &str,
        password: &str,
        db: &str,
        params: &[(&str, &str)],
    ) -> (Raw, Vec<(String, String)>, i32, i32) {
        let mut c = Raw::connect(addr).await;
        let mut reported = Vec::new();
        let mut b = BytesMut::new();
        if ssl_probe {
            frontend::ssl_request(&mut b);
            c.send(&b).await;
            let mut answer = [0u8; 1];
            within("SSLRequest answer", c.stream.read_exact(&mut answer))
                .await
                .expect("SSLRequest answer");
            assert_eq!(answer[0], b'N', "Sluice does not offer TLS");
            b.clear();
        }
        let startup = [("user", user), ("database", db)]
            .into_iter()
            .chain(params.iter().copied());
        frontend::startup_message(startup, &mut b).expect("encode");
        c.send(&b).await;
        let mut scram: Option<ScramSha256> = None;
        let (mut pid, mut secret) = (0, 0);
        loop {
            let (tag, body) = c.recv().await;
            b.clear();
            match tag {
                b'R' => {
                    let code = i32::from_be_bytes(body[..4].try_into().expect("code"));
                    let data = &body[4..];
                    match code {
                        0 => {}
                        10 => {
                            assert!(
                                data.windows(13).any(|w| w == b"SCRAM-SHA-256"),
                                "SCRAM offered"
                            );
                            let s = ScramSha256::new(
                                password.as_bytes(),
                                ChannelBinding::unsupported(),
                            );
                            frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut b)
                                .expect("encode");
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram.as_mut().expect("SASL started");
                            s.update(data).expect("server-first-message");
                            frontend::sasl_response(s.message(), &mut b).expect("encode");
                        }
                        12 => scram
                            .as_mut()
                            .expect("SASL started")
                            .finish(data)
                            .expect("server signature verifies"),
                        other => panic!("unexpected authentication request {other}"),
                    }
                }
                b'K' => {
                    pid = i32::from_be_bytes(body[..4].try_into().expect("pid"));
                    secret = i32::from_be_bytes(body[4..8].try_into().expect("secret"));
                }
                b'S' => {
                    let mut parts = body.split(|&b| b == 0).map(String::from_utf8_lossy);
                    let name = parts.next().unwrap_or_default().into_owned();
                    let value = parts.next().unwrap_or_default().into_owned();
                    reported.push((name, value));
                }
                b'N' => {}
                b'Z' => return (c, reported, pid, secret),
                b'E' => panic!("login failed: {:?}", fields(&body)),
                other => panic!("unexpected message '{}' during login", other as char),
            }
            if !b.is_empty() {
                c.send(&b).await;
            }
        }
    }
}

pub fn tags(msgs: &[Msg]) -> String {
    msgs.iter().map(|m| m.0 as char).collect()
}

/// Fields of an ErrorResponse or NoticeResponse body.
pub fn fields(body: &[u8]) -> HashMap<char, String> {
    let mut out = HashMap::new();
    let mut rest = body;
    while let Some((&kind, tail)) = rest.split_first() {
        if kind == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        out.insert(
            kind as char,
            String::from_utf8_lossy(&tail[..end]).into_owned(),
        );
        rest = tail.get(end + 1..).unwrap_or(&[]);
    }
    out
}

/// SQLSTATE of the first ErrorResponse among `msgs`.
/// What a client sees of one answer: each message's tag and body, except that error and notice
/// fields other than severity, SQLSTATE, message, detail and hint (file, line, routine,
/// position) are left out: for comparing answers through Sluice and directly.
pub fn seen(msgs: &[Msg]) -> Vec<String> {
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

pub fn error_code(msgs: &[Msg]) -> Option<String> {
    msgs.iter()
        .find(|m| m.0 == b'E')
        .and_then(|m| fields(&m.1).get(&'C').cloned())
}

/// Text columns of a DataRow body.
pub fn row_text(body: &[u8]) -> Vec<Option<String>> {
    let n = i16::from_be_bytes([body[0], body[1]]) as usize;
    let mut pos = 2;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let len = i32::from_be_bytes(body[pos..pos + 4].try_into().expect("len"));
        pos += 4;
        if len < 0 {
            out.push(None);
        } else {
            let end = pos + len as usize;
            out.push(Some(String::from_utf8_lossy(&body[pos..end]).into_owned()));
            pos = end;
        }
    }
    out
}

pub fn rows(msgs: &[Msg]) -> Vec<Vec<Option<String>>> {
    msgs.iter()
        .filter(|m| m.0 == b'D')
        .map(|m| row_text(&m.1))
        .collect()
}

/// A CopyData message.
pub fn copy_data(data: &[u8], out: &mut BytesMut) {
    out.put_u8(b'd');
    out.put_u32(4 + data.len() as u32);
    out.put_slice(data);
}
