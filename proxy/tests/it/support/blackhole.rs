//! A TCP endpoint that can turn into a black hole: a listener inside a network namespace of
//! the test's own, reached over a veth pair, that relays to a target on the host's loopback.
//! `cut()` sets the namespace's end of the link down: from then on packets to the endpoint are
//! dropped without a reply (no RST, no FIN), as when a failed-over database host vanishes.
//! `mend()` sets it up again. The relay itself can also delay what it forwards (`delay`), reset
//! every connection through it (`reset`: RST both ways), and forget connections idle for a while
//! as an AWS NLB does after its idle timeout (`forget_idle`: the next bytes from either side get
//! a RST). Needs root (CI runs as root) and `ip`.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub struct BlackHole {
    ns: String,
    host_if: String,
    ns_if: String,
    /// Where clients connect: an address inside the namespace.
    pub addr: SocketAddr,
    relay: JoinHandle<()>,
    faults: Arc<Faults>,
}

/// What the relay does to its connections, set on command.
#[derive(Default)]
struct Faults {
    /// Milliseconds each read is held before it is forwarded.
    delay_ms: AtomicU64,
    /// Bumped by `reset`: connections made before are reset.
    generation: AtomicU64,
    /// Held by every connection of the current generation (taken with it, under this lock),
    /// so `reset` can wait until the older ones are gone.
    current: std::sync::Mutex<Arc<()>>,
    /// Connections idle this long (milliseconds) are forgotten; 0: never.
    forget_ms: AtomicU64,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip` (install iproute2): {e}"));
    assert!(
        out.status.success(),
        "ip {}: {} (network namespaces need root)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

impl BlackHole {
    /// An endpoint relaying to `target` (on the host's loopback).
    pub async fn start(target: SocketAddr) -> BlackHole {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = (std::process::id() % 4096) * 16 + n % 16;
        let ns = format!("slbh{tag}");
        let host_if = format!("slbh{tag}h");
        let ns_if = format!("slbh{tag}n");
        // A /30 of its own in 10.200.0.0/14.
        let (second, third, fourth) = (
            200 + (tag >> 14) as u8,
            (tag >> 6) as u8,
            (tag & 63) as u8 * 4,
        );
        let host_ip = Ipv4Addr::new(10, second, third, fourth + 1);
        let ns_ip = Ipv4Addr::new(10, second, third, fourth + 2);
        // Left over from a killed run.
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        ip(&["netns", "add", &ns]);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]);
        ip(&["link", "set", &ns_if, "netns", &ns]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&[
            "netns",
            "exec",
            &ns,
            "ip",
            "addr",
            "add",
            &format!("{ns_ip}/30"),
            "dev",
            &ns_if,
        ]);
        ip(&["netns", "exec", &ns, "ip", "link", "set", &ns_if, "up"]);
        ip(&["netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);

        // The listening socket is made inside the namespace (by a thread that enters it); the
        // relay's connections to the target are made from the host's, by the runtime.
        let path = format!("/var/run/netns/{ns}");
        let listener = std::thread::spawn(move || {
            let f = std::fs::File::open(&path).expect("open the namespace");
            // SAFETY: setns on this thread only, with a valid namespace descriptor.
            let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            let l = std::net::TcpListener::bind(SocketAddrV4::new(ns_ip, 0)).expect("bind");
            l.set_nonblocking(true).expect("nonblocking");
            l
        })
        .join()
        .expect("namespace thread");
        let addr = listener.local_addr().expect("addr");
        let listener = TcpListener::from_std(listener).expect("tokio listener");
        let faults = Arc::new(Faults::default());
        let shared = faults.clone();
        let relay = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                let faults = shared.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (generation, alive) = {
                        let current = faults.current.lock().expect("faults");
                        (faults.generation.load(Ordering::Relaxed), current.clone())
                    };
                    relay(inbound, outbound, &faults, generation).await;
                    // After the sockets, which the relay has closed.
                    drop(alive);
                });
            }
        });
        BlackHole {
            ns,
            host_if,
            ns_if,
            addr,
            relay,
            faults,
        }
    }

    /// Holds everything forwarded from now on for `d` (zero: no delay).
    pub fn delay(&self, d: Duration) {
        self.faults
            .delay_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
    }

    /// Resets every connection through the relay (RST to both ends) and returns once all of
    /// them are reset; new ones pass.
    pub async fn reset(&self) {
        let older = {
            let mut current = self.faults.current.lock().expect("faults");
            self.faults.generation.fetch_add(1, Ordering::Relaxed);
            Arc::downgrade(&std::mem::replace(&mut *current, Arc::new(())))
        };
        crate::support::within("the relay's connections to be reset", async {
            while older.strong_count() > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }

    /// From now on connections idle for `after` are forgotten, as an NLB forgets a flow after
    /// its idle timeout: the next bytes either end sends are answered with a RST (to both).
    pub fn forget_idle(&self, after: Duration) {
        self.faults
            .forget_ms
            .store(after.as_millis() as u64, Ordering::Relaxed);
    }

    /// From now on, packets to the endpoint vanish.
    pub fn cut(&self) {
        self.link("down");
    }

    pub fn mend(&self) {
        self.link("up");
    }

    fn link(&self, state: &str) {
        ip(&[
            "netns",
            "exec",
            &self.ns,
            "ip",
            "link",
            "set",
            &self.ns_if,
            state,
        ]);
    }
}

/// Relays between `a` (the client's end) and `b` until either closes, applying `faults`;
/// `generation` is the one it was made in (a `reset` since ends it).
async fn relay(mut a: TcpStream, mut b: TcpStream, faults: &Faults, generation: u64) {
    let (mut from_a, mut from_b) = (vec![0u8; 64 << 10], vec![0u8; 64 << 10]);
    let mut last = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let reset = |a: &TcpStream, b: &TcpStream| {
        let _ = a.set_zero_linger();
        let _ = b.set_zero_linger();
    };
    loop {
        let (read, to_a) = tokio::select! {
            r = a.read(&mut from_a) => (r, false),
            r = b.read(&mut from_b) => (r, true),
            _ = tick.tick() => {
                if faults.generation.load(Ordering::Relaxed) != generation {
                    reset(&a, &b);
                    return;
                }
                continue;
            }
        };
        let n = match read {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let forget = faults.forget_ms.load(Ordering::Relaxed);
        if forget > 0 && last.elapsed() >= Duration::from_millis(forget) {
            // A forgotten flow: the bytes are not forwarded, both ends get a RST.
            reset(&a, &b);
            return;
        }
        last = Instant::now();
        let delay = faults.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let written = if to_a {
            a.write_all(&from_b[..n]).await
        } else {
            b.write_all(&from_a[..n]).await
        };
        if written.is_err() {
            return;
        }
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.relay.abort();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
    }
}
