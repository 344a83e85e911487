//! A TCP endpoint that can turn into a black hole: a listener inside a network namespace of
//! the test's own, reached over a veth pair, that relays to a target on the host's loopback.
//! `cut()` sets the namespace's end of the link down: from then on packets to the endpoint are
//! dropped without a reply (no RST, no FIN), as when a failed-over database host vanishes.
//! `mend()` sets it up again. Needs root (CI runs as root) and `ip`.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub struct BlackHole {
    ns: String,
    host_if: String,
    ns_if: String,
    /// Where clients connect: an address inside the namespace.
    pub addr: SocketAddr,
    relay: JoinHandle<()>,
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
        let relay = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
            }
        });
        BlackHole {
            ns,
            host_if,
            ns_if,
            addr,
            relay,
        }
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

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.relay.abort();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
    }
}
