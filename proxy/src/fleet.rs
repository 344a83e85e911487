//! One budget across a fleet of instances, kept in the database itself.
//!
//! The instances that share a `fleet` name divide `max_server_connections` (B) into B slots,
//! each a session advisory lock (`pg_try_advisory_lock(base, slot)`) held by one instance's
//! **coordination session**: a connection of its own, never pooled or recycled, so its locks
//! live exactly as long as it does and PostgreSQL itself frees them when it ends (a killed
//! process's at once, a vanished host's within `fleet_dead_after`, which the session asks the
//! server for with its `tcp_keepalives_*` and `tcp_user_timeout`). An instance's pools may
//! use as many server connections as it holds slots, less its own overhead (the coordination
//! session, and the `auth_query` control pool's connection).
//!
//! Every `fleet_interval`, and as soon as a client has to queue, a member reads the fleet's
//! locks in `pg_locks` (one query): who is a member (a lock of `base + 1`), who holds which
//! slots, who is short of slots (`base + 2`) and who is short below its fair share
//! (`base + 3`). Then:
//! - **growing**: with more demand (lent connections, waiting clients, overhead) than slots,
//!   it takes free slots, leaving `fleet_spare` free for an instance that starts to log in;
//! - **asking**: still short, it holds its *short* lock, and below its fair share (B /
//!   members) its *want* lock too;
//! - **giving back**: while another member is short (or fewer than `fleet_spare` slots are
//!   free) it lowers its pools' budget to its demand, closing idle connections; while another
//!   is below its fair share, to the smaller of its demand and its own fair share, lent
//!   connections over it closed as they come back. A slot is unlocked only once the
//!   connection it covered is gone on the server too (see [`crate::server`]'s backend count).
//!
//! So a slot is never unlocked while a connection it covers may still exist, and a
//! connection is never opened before its slot is locked: the fleet's server connections stay
//! within B, as the server counts them. The exceptions are stated in README ("Running more
//! than one instance"): an instance's first moments (its coordination login before it holds
//! a slot, covered by `fleet_spare`), and a coordination session that ends while its instance
//! lives on (an administrator terminating it, a partition), whose connections outlive its
//! locks until they are closed.
//!
//! Every group's `max_connections` and `reserved_connections` are divided the same way, each
//! in lock spaces of its own ([`GroupSpace`], read by the same query): a member lends a capped
//! group no more connections than it holds slots of the cap, and holds back for a group no
//! more than it holds slots of the reservation, which it holds only while the group has that
//! demand there; its fair share of the budget counts those reservation slots first.

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// What this instance last saw of its fleet (for metrics, `SHOW FLEET` and the status page).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct View {
    pub name: String,
    /// Whether the coordination session is up.
    pub connected: bool,
    pub budget: u32,
    pub members: u32,
    /// Slots this instance holds, its fair share, and the whole fleet's.
    pub held: u32,
    pub fair_share: u32,
    pub fleet_held: u32,
    pub wanting: bool,
    /// The pools' budget: `held` less the coordination session and the control pool.
    pub pool_budget: u32,
    /// The other members: their cancel tags and where they take cancel requests.
    pub peers: Vec<Peer>,
}

/// Another fleet member, as its coordination session's `application_name` announces it
/// (`sluice-fleet TAG HOST:PORT`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Peer {
    pub tag: i32,
    pub addr: std::net::SocketAddr,
}

/// What a member's coordination session calls itself: its tag and cancel address.
pub fn application_name(tag: i32, addr: std::net::SocketAddr) -> String {
    format!("sluice-fleet {tag} {addr}")
}

/// The member an `application_name` announces, if it is one.
pub fn parse_peer(application_name: &str) -> Option<Peer> {
    let mut words = application_name.strip_prefix("sluice-fleet ")?.split(' ');
    let tag = words.next()?.parse().ok()?;
    let addr = words.next()?.parse().ok()?;
    Some(Peer { tag, addr })
}

/// The fleet state every session shares: a lone instance has none.
#[derive(Default)]
pub struct Fleet {
    view: Mutex<Option<View>>,
    /// Rung when a client has to queue: a member looks for more slots at once.
    pub demand: Notify,
    /// Ended once the pools are drained: the member gives its slots back and logs out.
    pub leave: CancellationToken,
    /// This member's tag (see [`crate::clients::ClientRegistry::set_tag`]); 0: no fleet.
    pub tag: std::sync::atomic::AtomicI32,
    /// The client listen address (what [`View::peers`] announce, unless `fleet_advertise`).
    pub listen: std::sync::OnceLock<std::net::SocketAddr>,
}

impl Fleet {
    /// Sends a CancelRequest this instance does not know to the member whose tag its process
    /// id carries (every member with that tag, should two have drawn the same one). Never
    /// forwards a key of its own tag, so a request is forwarded once at most.
    pub fn forward_cancel(&self, process_id: i32, secret_key: i32, timeout: std::time::Duration) {
        let tag = crate::clients::tag_of(process_id);
        let own = self.tag.load(std::sync::atomic::Ordering::Relaxed);
        if tag == 0 || tag == own {
            return;
        }
        let peers: Vec<Peer> = self
            .view
            .lock()
            .iter()
            .flat_map(|v| v.peers.iter().filter(|p| p.tag == tag).cloned())
            .collect();
        if peers.is_empty() {
            tracing::debug!(
                process_id,
                "cancel request for no known fleet member ignored"
            );
        }
        for peer in peers {
            tokio::spawn(async move {
                let key = crate::server::CancelKey {
                    addr: peer.addr,
                    process_id,
                    secret_key,
                };
                match key.send(timeout).await {
                    Ok(()) => {
                        tracing::debug!(peer = %peer.addr, "cancel request forwarded to a fleet member")
                    }
                    Err(e) => {
                        tracing::warn!(peer = %peer.addr, error = %e, "forwarding a cancel request to a fleet member failed")
                    }
                }
            });
        }
    }

    pub fn view(&self) -> Option<View> {
        self.view.lock().clone()
    }

    /// The pools' budget as the fleet allows it, `None` for a lone instance.
    pub fn pool_budget(&self) -> Option<u32> {
        self.view.lock().as_ref().map(|v| v.pool_budget)
    }

    pub fn set(&self, v: View) {
        let g = crate::metrics::global();
        g.budget.set(f64::from(v.pool_budget));
        metrics::gauge!(crate::metrics::FLEET_SLOTS, "held" => "instance").set(f64::from(v.held));
        metrics::gauge!(crate::metrics::FLEET_SLOTS, "held" => "fleet")
            .set(f64::from(v.fleet_held));
        metrics::gauge!(crate::metrics::FLEET_SLOTS, "held" => "budget").set(f64::from(v.budget));
        metrics::gauge!(crate::metrics::FLEET_INSTANCES).set(f64::from(v.members));
        metrics::gauge!(crate::metrics::FLEET_WANTING).set(if v.wanting { 1.0 } else { 0.0 });
        *self.view.lock() = Some(v);
    }
}

/// Why coordination failed; the texts name the server and the role, never a secret.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("no fleet coordination session to {server} as \"{user}\": {detail}")]
    Connect {
        server: String,
        user: String,
        detail: String,
    },
    #[error("the fleet coordination query failed: {0}")]
    Query(String),
    #[error("the fleet coordination query took over {0} ms")]
    Timeout(u128),
    #[error("the fleet coordination session ended or lost its membership lock")]
    Lost,
    #[error("no login for fleet coordination: set control_user (or configure a user)")]
    NoLogin,
}

impl FleetError {
    pub fn kind(&self) -> &'static str {
        match self {
            FleetError::Connect { .. } | FleetError::NoLogin => "connect",
            FleetError::Query(_) | FleetError::Timeout(_) => "query",
            FleetError::Lost => "lost",
        }
    }
}

pub fn query_error(e: tokio_postgres::Error) -> FleetError {
    if e.is_closed() {
        return FleetError::Lost;
    }
    FleetError::Query(match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    })
}

/// The first of the three lock spaces (`classid`s) of fleet `name`: slots, members, wants.
/// FNV-1a, stable across builds and platforms; a multiple of 4 below 2^31.
pub fn lock_base(name: &str) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    ((h & 0x1fff_ffff) * 4) as i32
}

/// The slots a member of `members` may count on when all ask: the budget divided evenly, the
/// first `budget % members` by member id (`rank`) one more.
pub fn fair_share(budget: u32, members: u32, rank: u32) -> u32 {
    let n = members.max(1);
    budget / n + u32::from(rank < budget % n)
}

/// Free slots a member with `busy` demand and `held` slots takes now: what it lacks, leaving
/// `spare` free unless it holds none (its own session needs one to count in the budget).
pub fn to_take(busy: u32, held: u32, free: u32, spare: u32) -> u32 {
    let spare = if held == 0 { 0 } else { spare };
    busy.saturating_sub(held).min(free.saturating_sub(spare))
}

/// Whether a member asks the others for slots: short of its demand and below its fair share
/// (at or above it, it takes only what is free).
pub fn asks(busy: u32, held: u32, fair: u32) -> bool {
    busy > held && held < fair
}

/// What the other members ask for.
#[derive(Debug, Clone, Copy, Default)]
pub struct Asked {
    /// One is short of slots (or the spare slots are taken): idle slots are given back.
    pub idle: bool,
    /// One is short and below its fair share: slots above the fair share are given back too.
    pub fair: bool,
}

/// The slots a member keeps for its pools (its overhead included): all it holds unless asked;
/// its demand when another is short; no more than its demand and its fair share when another
/// is below its own.
pub fn target(asked: Asked, busy: u32, fair: u32, overhead: u32, held: u32) -> u32 {
    let keep = if asked.fair {
        busy.min(fair)
    } else if asked.idle {
        busy
    } else {
        held
    };
    keep.max(overhead).min(held)
}

/// The slots a member still holds after giving back: never fewer than cover the connections
/// that exist (`in_use`, closing ones included) or its `target`.
pub fn keep(target: u32, in_use: u32, held: u32) -> u32 {
    target.max(in_use).min(held)
}

/// One of a group's limits that a fleet divides among its members as it divides the budget:
/// the group's `max_connections` (a member lends the group no more connections than it holds
/// slots of the cap) or its `reserved_connections` (a member holds back for the group no more
/// than it holds slots of the reservation, and holds no more of those than the group's demand
/// there, so that an idle member never keeps a reservation another needs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSpace {
    pub group: String,
    pub reservation: bool,
    /// Its lock spaces: slots at `base`, *short* at `base + 2`, *want* at `base + 3`.
    pub base: i32,
    pub size: u32,
}

/// The group limits fleet `name` divides: every configured cap and reservation.
pub fn group_spaces(name: &str, cfg: &crate::config::Config) -> Vec<GroupSpace> {
    let mut spaces = Vec::new();
    for (group, g) in &cfg.groups {
        if let Some(size) = g.max_connections {
            spaces.push(GroupSpace {
                group: group.clone(),
                reservation: false,
                base: lock_base(&format!("{name}/{group}/max_connections")),
                size,
            });
        }
        if let Some(size) = g.reserved_connections.filter(|r| *r > 0) {
            spaces.push(GroupSpace {
                group: group.clone(),
                reservation: true,
                base: lock_base(&format!("{name}/{group}/reserved_connections")),
                size,
            });
        }
    }
    spaces
}

/// A member's fair share of the budget when members hold `reserved_total` slots of groups'
/// reservations, `reserved_mine` of them its own: its reservations, plus an even part of the
/// rest (so a member whose group needs its reservation is given the slots for it).
pub fn fair_share_reserved(
    budget: u32,
    reserved_total: u32,
    reserved_mine: u32,
    members: u32,
    rank: u32,
) -> u32 {
    let reserved_total = reserved_total.min(budget);
    reserved_mine.min(reserved_total) + fair_share(budget - reserved_total, members, rank)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fair_shares_add_up_to_the_budget() {
        for budget in [1, 12, 400] {
            for n in 1..60 {
                let total: u32 = (0..n).map(|r| fair_share(budget, n, r)).sum();
                assert_eq!(total, budget, "budget {budget}, {n} members");
            }
        }
    }

    #[test]
    fn a_member_takes_what_it_lacks_leaving_the_spare_slots() {
        assert_eq!(to_take(10, 2, 5, 1), 4);
        assert_eq!(to_take(10, 2, 1, 1), 0);
        // With no slot yet, even the spare one (its own session must be counted).
        assert_eq!(to_take(10, 0, 1, 1), 1);
        assert_eq!(to_take(2, 5, 9, 1), 0);
    }

    #[test]
    fn giving_back_keeps_what_is_in_use_and_the_overhead() {
        let (none, idle) = (
            Asked::default(),
            Asked {
                idle: true,
                fair: false,
            },
        );
        let fair = Asked {
            idle: true,
            fair: true,
        };
        // Nobody asks: everything is kept.
        assert_eq!(target(none, 1, 4, 1, 10), 10);
        // Someone is short: idle slots go back, busy ones stay, even above the fair share.
        assert_eq!(target(idle, 7, 4, 1, 10), 7);
        assert_eq!(target(idle, 0, 4, 1, 10), 1);
        // Someone is below its fair share: down to the fair share, or the demand below it.
        assert_eq!(target(fair, 12, 4, 1, 10), 4);
        assert_eq!(target(fair, 2, 4, 1, 10), 2);
        assert_eq!(target(fair, 0, 4, 1, 10), 1);
        // Connections still open (or closing) keep their slots until they have gone.
        assert_eq!(keep(4, 7, 10), 7);
        assert_eq!(keep(4, 2, 10), 4);
        assert!(asks(5, 2, 4) && !asks(5, 4, 4) && !asks(2, 2, 4));
    }

    #[test]
    fn members_announce_their_tag_and_address() {
        let addr = "10.0.1.23:6432".parse().expect("addr");
        let name = application_name(4095, addr);
        assert!(name.len() < 64, "fits NAMEDATALEN");
        assert_eq!(parse_peer(&name), Some(Peer { tag: 4095, addr }));
        let v6 = "[2001:db8::1]:6432".parse().expect("addr");
        assert_eq!(
            parse_peer(&application_name(7, v6)),
            Some(Peer { tag: 7, addr: v6 })
        );
        assert_eq!(parse_peer("sluice"), None);
        assert_eq!(parse_peer("sluice-fleet x 1.2.3.4:5"), None);
    }

    #[test]
    fn lock_spaces_are_stable_and_positive() {
        let b = lock_base("prod");
        assert_eq!(b, lock_base("prod"));
        assert_ne!(b, lock_base("staging"));
        assert!(b >= 0 && b % 4 == 0 && b.checked_add(2).is_some());
    }

    #[test]
    fn reservations_come_first_in_the_fair_share() {
        // Budget 12, 3 members, member 1 holds 4 slots of a group's reservation.
        let shares: Vec<u32> = (0..3)
            .map(|r| fair_share_reserved(12, 4, if r == 1 { 4 } else { 0 }, 3, r))
            .collect();
        assert_eq!(shares, vec![3, 7, 2]);
        assert_eq!(shares.iter().sum::<u32>(), 12);
        // Reservations over the budget (a RELOAD under way) never overflow it.
        assert_eq!(fair_share_reserved(4, 9, 9, 1, 0), 4);
    }

    #[test]
    fn group_limits_have_lock_spaces_of_their_own() {
        let mut cfg = crate::config::Config::default();
        cfg.groups.insert(
            "etl".into(),
            crate::config::GroupConfig {
                max_connections: Some(5),
                reserved_connections: Some(2),
                max_waiting: None,
            },
        );
        cfg.groups.insert("web".into(), Default::default());
        let spaces = group_spaces("prod", &cfg);
        assert_eq!(spaces.len(), 2);
        assert!(!spaces[0].reservation && spaces[1].reservation);
        assert_eq!((spaces[0].size, spaces[1].size), (5, 2));
        let bases = [lock_base("prod"), spaces[0].base, spaces[1].base];
        assert!(bases[0] != bases[1] && bases[1] != bases[2] && bases[0] != bases[2]);
        assert!(bases.iter().all(|b| b % 4 == 0));
    }
}
