//! A fleet member's coordination session: joins the fleet, looks at it every
//! `fleet_interval` (and when a client queues), takes, asks for and gives back budget slots as
//! [`crate::fleet`] describes, and leaves once the pools are drained.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::context::Context;
use crate::fleet::{self, lock_base, query_error, FleetError, View};
use crate::server::Target;

/// The fleet's locks in the lock spaces based at `$1` (the budget's and its groups' limits'):
/// (lock space, key, holder's pid, holder's application_name).
const LOCKS_SQL: &str = "SELECT l.classid::int8, l.objid::int8, l.pid, a.application_name \
     FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid \
     WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
     AND l.classid::int8 - l.classid::int8 % 4 = ANY($1::int8[])";
/// Locks the first `$3` of the slots `$2` that are free, one round trip; returns those taken.
const TAKE_SQL: &str =
    "SELECT s FROM unnest($2::int4[]) AS s WHERE pg_try_advisory_lock($1::int4, s) LIMIT $3::int8";
const RELEASE_SQL: &str =
    "SELECT count(*) FROM unnest($2::int4[]) AS s WHERE pg_advisory_unlock($1::int4, s)";
const TRY_LOCK_SQL: &str = "SELECT pg_try_advisory_lock($1::int4, $2::int4)";
const UNLOCK_SQL: &str = "SELECT pg_advisory_unlock($1::int4, $2::int4)";

/// Coordination statements sent by every member in this process (the fleet study reads it).
pub static STATEMENTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Runs this instance's membership until `fleet.leave`: joins, coordinates, and after a lost
/// session keeps the pools at a budget of 0 until it has joined again.
pub async fn run(ctx: Arc<Context>) {
    loop {
        let cfg = ctx.config();
        let Some(name) = cfg.fleet.clone() else {
            return;
        };
        let result = tokio::select! {
            r = Member::join(&ctx, &cfg, &name) => r,
            _ = ctx.fleet.leave.cancelled() => return,
        };
        let lost = match result {
            Ok(mut m) => {
                tracing::info!(fleet = %name, instance = m.id, "joined the fleet");
                let end = m.serve(&ctx).await;
                if ctx.fleet.leave.is_cancelled() && end.is_ok() {
                    return;
                }
                end.err()
            }
            Err(e) => Some(e),
        };
        if let Some(e) = lost {
            metrics::counter!(crate::metrics::FLEET_ERRORS, "kind" => e.kind()).increment(1);
            tracing::warn!(fleet = %name, error = %e, "fleet coordination lost: no server connections beyond those lent until it is back");
        }
        let mut v = ctx.fleet.view().unwrap_or_default();
        v.name = name;
        v.connected = false;
        v.held = 0;
        v.pool_budget = 0;
        v.wanting = false;
        ctx.fleet.set(v);
        ctx.pools.set_budget(0);
        tokio::select! {
            _ = tokio::time::sleep(cfg.fleet_interval.max(Duration::from_millis(200))) => {}
            _ = ctx.fleet.leave.cancelled() => return,
        }
    }
}

struct Member {
    client: tokio_postgres::Client,
    connection: tokio::task::JoinHandle<()>,
    name: String,
    base: i32,
    id: i32,
    pid: i32,
    /// The lock spaces of the groups' limits it last looked at (a RELOAD may drop some).
    group_bases: Vec<i64>,
}

/// What one look shows of a lock space, the budget's or a group limit's: the slots taken,
/// this member's among them, and the members whose short and want flags are set.
#[derive(Default)]
struct Seen {
    taken: HashSet<i64>,
    mine: BTreeSet<i32>,
    short: HashSet<i32>,
    wanting: HashSet<i32>,
}

/// What this member needs of a lock space in one look.
struct Need {
    /// The slots it would use: connections lent and being opened, clients waiting.
    busy: u32,
    fair: u32,
    /// Free slots a member that holds some leaves to those that hold none.
    spare: u32,
    /// Slots its own sessions use (the budget's only).
    overhead: u32,
    /// Gives back idle slots even when no other member is short (a reservation's).
    give_idle: bool,
}

/// A lock space's decision, between taking slots and giving them back.
struct Plan {
    base: i32,
    held: BTreeSet<i32>,
    target: u32,
    /// Its want flag: below its fair share and short.
    wants: bool,
}

impl Drop for Member {
    fn drop(&mut self) {
        // Ending the session is what frees its locks; the connection task owns the socket.
        self.connection.abort();
    }
}

/// Where the other members send cancel requests for this instance's clients: `fleet_advertise`,
/// else the client listen address, its IP taken from the coordination session's socket (the
/// address this host reaches the server from) when it listens on all addresses.
async fn advertised(
    ctx: &Context,
    cfg: &Config,
    local: std::net::SocketAddr,
) -> Option<std::net::SocketAddr> {
    if let Some(a) = &cfg.fleet_advertise {
        return match tokio::net::lookup_host(a.as_str()).await {
            Ok(mut addrs) => addrs.next(),
            Err(e) => {
                tracing::warn!(fleet_advertise = %a, error = %e, "fleet_advertise does not resolve");
                None
            }
        };
    }
    let mut listen = *ctx.fleet.listen.get()?;
    if listen.ip().is_unspecified() {
        listen.set_ip(local.ip());
    }
    Some(listen)
}

/// The coordination session's server-side keepalive, so that the server ends it (and frees
/// its locks) within about `dead_after` of its host going silent.
fn keepalive_options(dead_after: Duration) -> String {
    let total = dead_after.as_secs().max(2);
    let idle = (total / 2).max(1);
    let interval = ((total - idle) / 3).max(1);
    format!(
        "-c tcp_keepalives_idle={idle} -c tcp_keepalives_interval={interval} -c tcp_keepalives_count=3 -c tcp_user_timeout={}",
        total * 1000
    )
}

impl Member {
    async fn join(ctx: &Context, cfg: &Config, name: &str) -> Result<Member, FleetError> {
        let (database, user) = cfg.first_login().ok_or(FleetError::NoLogin)?;
        let target = Target::new(
            cfg,
            &ctx.tls().connector,
            ctx.server_password(&user),
            &database,
            &user,
        );
        let mut pg = tokio_postgres::Config::new();
        pg.user(&user)
            .dbname(&target.database)
            .application_name("sluice-fleet")
            .options(keepalive_options(cfg.fleet_dead_after))
            .ssl_mode(tokio_postgres::config::SslMode::Disable)
            .channel_binding(tokio_postgres::config::ChannelBinding::Disable);
        let server = format!("{}:{}", target.host, target.port);
        let (client, connection, local) = crate::control::connect_dedicated(target, &pg)
            .await
            .map_err(|e| FleetError::Connect {
                server,
                user: user.clone(),
                detail: e.to_string(),
            })?;
        let advertise = advertised(ctx, cfg, local).await;
        let base = lock_base(name);
        let mut m = Member {
            client,
            connection,
            name: name.to_string(),
            base,
            id: 0,
            pid: 0,
            group_bases: Vec::new(),
        };
        let timeout = cfg.fleet_dead_after;
        let row = m
            .timed(timeout, m.client.query_one("SELECT pg_backend_pid()", &[]))
            .await?;
        m.pid = row.get(0);
        // Announced to the other members: where cancel requests for this member's clients go.
        let tag = ctx.clients.tag();
        match advertise {
            Some(addr) => {
                let name = fleet::application_name(tag, addr);
                m.timed(
                    timeout,
                    m.client
                        .query_one("SELECT set_config('application_name', $1, false)", &[&name]),
                )
                .await?;
            }
            None => {
                tracing::warn!(fleet = %name, "no address to announce (set fleet_advertise): cancel requests for this instance's clients reach it only directly")
            }
        }
        // A member id of its own: a random one, taken as a lock of the member space.
        loop {
            let id = (rand::random::<u32>() >> 1) as i32;
            let row = m
                .timed(
                    timeout,
                    m.client.query_one(TRY_LOCK_SQL, &[&(base + 1), &id]),
                )
                .await?;
            if row.get::<_, bool>(0) {
                m.id = id;
                return Ok(m);
            }
        }
    }

    async fn timed<T>(
        &self,
        limit: Duration,
        fut: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, FleetError> {
        STATEMENTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        metrics::counter!(crate::metrics::FLEET_STATEMENTS).increment(1);
        match tokio::time::timeout(limit, fut).await {
            Ok(r) => r.map_err(query_error),
            Err(_) => Err(FleetError::Timeout(limit.as_millis())),
        }
    }

    /// Unlocks this member's `keys` in lock space `base`.
    async fn release(&self, limit: Duration, base: i32, keys: &[i32]) -> Result<(), FleetError> {
        self.timed(limit, self.client.query_one(RELEASE_SQL, &[&base, &keys]))
            .await?;
        Ok(())
    }

    /// Takes (`on`) or drops this member's lock in lock space `class`: a flag the others read.
    async fn flag(&self, limit: Duration, class: i32, on: bool) -> Result<(), FleetError> {
        let sql = if on { TRY_LOCK_SQL } else { UNLOCK_SQL };
        self.timed(limit, self.client.query_one(sql, &[&class, &self.id]))
            .await?;
        Ok(())
    }

    /// Coordinates until the session fails (an error) or the instance leaves (`Ok`).
    async fn serve(&mut self, ctx: &Context) -> Result<(), FleetError> {
        let mut last = tokio::time::Instant::now();
        loop {
            let cfg = ctx.config();
            self.tick(ctx, &cfg).await?;
            if ctx.fleet.leave.is_cancelled() {
                return self.leave(ctx, &cfg).await;
            }
            // A queueing client brings the next look forward, at most ten a second.
            let next = last + cfg.fleet_interval;
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = ctx.fleet.demand.notified() => {
                    tokio::time::sleep_until(last + Duration::from_millis(100)).await;
                }
                _ = ctx.fleet.leave.cancelled() => {}
            }
            last = tokio::time::Instant::now();
        }
    }

    /// One look at the fleet: take, ask for, or give back slots of the budget, then of the
    /// groups' limits.
    async fn tick(&mut self, ctx: &Context, cfg: &Config) -> Result<(), FleetError> {
        let limit = cfg.fleet_dead_after;
        let budget = cfg.max_server_connections;
        let overhead = 1 + crate::control::reserved(cfg);
        let spaces = fleet::group_spaces(&self.name, cfg);
        let mut bases: Vec<i64> = spaces.iter().map(|g| i64::from(g.base)).collect();
        bases.extend(&self.group_bases);
        bases.push(i64::from(self.base));
        bases.sort_unstable();
        bases.dedup();
        let rows = self
            .timed(limit, self.client.query(LOCKS_SQL, &[&bases]))
            .await?;
        let mut seen: HashMap<i64, Seen> = HashMap::new();
        let mut members: HashMap<i32, i64> = HashMap::new();
        let mut peers = Vec::new();
        for r in &rows {
            let (class, key, pid): (i64, i64, i32) = (r.get(0), r.get(1), r.get(2));
            // Lock spaces start at multiples of 4 (see [`lock_base`]).
            let (space, offset) = (class - class % 4, class % 4);
            let s = seen.entry(space).or_default();
            match offset {
                0 => {
                    s.taken.insert(key);
                    if pid == self.pid {
                        s.mine.insert(key as i32);
                    }
                }
                // Only the budget has a member space.
                1 => {
                    members.insert(pid, key);
                    let name: Option<String> = r.get(3);
                    if let Some(peer) = name.as_deref().and_then(fleet::parse_peer) {
                        if pid != self.pid {
                            peers.push(peer);
                        }
                    }
                }
                2 => {
                    s.short.insert(pid);
                }
                _ => {
                    s.wanting.insert(pid);
                }
            }
        }
        if !members.contains_key(&self.pid) {
            return Err(FleetError::Lost);
        }
        let mine = seen.remove(&i64::from(self.base)).unwrap_or_default();
        let held_before = mine.mine.len() as u32;
        let fleet_held = mine.taken.len() as u32;
        let n = members.len() as u32;
        let mut ids: Vec<i64> = members.values().copied().collect();
        ids.sort_unstable();
        let rank = ids
            .iter()
            .position(|i| *i == i64::from(self.id))
            .unwrap_or(0) as u32;
        let (mut reserved_total, mut reserved_mine) = (0, 0);
        for g in spaces.iter().filter(|g| g.reservation) {
            if let Some(s) = seen.get(&i64::from(g.base)) {
                reserved_total += s.taken.len() as u32;
                reserved_mine += s.mine.len() as u32;
            }
        }
        let fair = fleet::fair_share_reserved(budget, reserved_total, reserved_mine, n, rank);
        let (lent, waiting, _) = ctx.pools.demand();
        let need = Need {
            busy: (overhead + lent + waiting).min(budget.max(1)),
            fair,
            // A member with no slot yet may take the spare ones (its own session needs one).
            spare: cfg.fleet_spare,
            overhead,
            give_idle: false,
        };
        let mut plan = self.step(limit, self.base, budget, &mine, need).await?;
        let pool_budget = plan.target.saturating_sub(overhead);
        ctx.pools.set_budget(pool_budget);
        // A slot is kept while a connection it covers may still exist on the server (closing
        // connections count until the server has closed them).
        self.give_back(limit, &mut plan, overhead + ctx.pools.demand().2)
            .await?;
        self.groups(ctx, cfg, spaces, seen, n, rank).await?;
        let held_now = plan.held.len() as u32;
        ctx.fleet.set(View {
            name: self.name.clone(),
            connected: true,
            budget,
            members: n,
            held: held_now,
            fair_share: fair,
            fleet_held: (fleet_held + held_now).saturating_sub(held_before),
            wanting: plan.wants,
            pool_budget,
            peers,
        });
        Ok(())
    }

    /// One lock space's part of a look: gives back slots numbered beyond its `size` (a RELOAD
    /// lowered it), takes free ones for what it needs, sets its short and want flags, and
    /// decides how many to keep: idle slots go while another member is short (or the spare
    /// slots are taken), busy ones above the fair share while another is below its own.
    async fn step(
        &self,
        limit: Duration,
        base: i32,
        size: u32,
        seen: &Seen,
        need: Need,
    ) -> Result<Plan, FleetError> {
        let mut held = seen.mine.clone();
        let beyond: Vec<i32> = held.iter().copied().filter(|k| *k >= size as i32).collect();
        if !beyond.is_empty() {
            self.release(limit, base, &beyond).await?;
            for k in &beyond {
                held.remove(k);
            }
        }
        let mut free: Vec<i32> = (0..size as i32)
            .filter(|k| !seen.taken.contains(&i64::from(*k)))
            .collect();
        let free_before = free.len() as u32;
        let want = fleet::to_take(need.busy, held.len() as u32, free_before, need.spare);
        if want > 0 {
            // From a random point, so that members taking at once mostly ask for different slots.
            let start = rand::random::<u32>() as usize % free.len().max(1);
            free.rotate_left(start);
            let got = self
                .timed(
                    limit,
                    self.client
                        .query(TAKE_SQL, &[&base, &free, &i64::from(want)]),
                )
                .await?;
            held.extend(got.iter().map(|r| r.get::<_, i32>(0)));
        }
        let n = held.len() as u32;
        let is_short = need.busy > n;
        if is_short != seen.short.contains(&self.pid) {
            self.flag(limit, base + 2, is_short).await?;
        }
        let wants = fleet::asks(need.busy, n, need.fair);
        if wants != seen.wanting.contains(&self.pid) {
            self.flag(limit, base + 3, wants).await?;
        }
        let others = |set: &HashSet<i32>| set.iter().any(|p| *p != self.pid);
        let asked = fleet::Asked {
            idle: need.give_idle || others(&seen.short) || free_before < need.spare.min(size),
            fair: others(&seen.wanting),
        };
        let target = fleet::target(asked, need.busy, need.fair, need.overhead, n);
        Ok(Plan {
            base,
            held,
            target,
            wants,
        })
    }

    /// Gives back the slots of `plan` above its target, keeping those `in_use` covers.
    async fn give_back(
        &self,
        limit: Duration,
        plan: &mut Plan,
        in_use: u32,
    ) -> Result<(), FleetError> {
        let held = plan.held.len() as u32;
        let keep = fleet::keep(plan.target, in_use, held);
        let give: Vec<i32> = plan
            .held
            .iter()
            .rev()
            .copied()
            .take((held - keep) as usize)
            .collect();
        if !give.is_empty() {
            self.release(limit, plan.base, &give).await?;
            for k in &give {
                plan.held.remove(k);
            }
        }
        Ok(())
    }

    /// Divides the groups' caps and reservations as [`Member::tick`] divides the budget: takes
    /// slots for a group's demand here (its lent connections and waiting clients), asks for
    /// them, gives back what others ask for (a reservation's down to the demand always), and
    /// gives the pools its share. A cap's slot is given back only once the group's lent
    /// connections fit in the rest.
    async fn groups(
        &mut self,
        ctx: &Context,
        cfg: &Config,
        spaces: Vec<fleet::GroupSpace>,
        mut seen: HashMap<i64, Seen>,
        members: u32,
        rank: u32,
    ) -> Result<(), FleetError> {
        let limit = cfg.fleet_dead_after;
        // Locks in the spaces of limits a RELOAD removed are let go of.
        let current: HashSet<i64> = spaces.iter().map(|g| i64::from(g.base)).collect();
        for (space, s) in seen.iter().filter(|(b, _)| !current.contains(b)) {
            let base = *space as i32;
            let keys: Vec<i32> = s.mine.iter().copied().collect();
            if !keys.is_empty() {
                self.release(limit, base, &keys).await?;
            }
            for (offset, set) in [(2, &s.short), (3, &s.wanting)] {
                if set.contains(&self.pid) {
                    self.flag(limit, base + offset, false).await?;
                }
            }
        }
        self.group_bases = current.into_iter().collect();

        let mut plans = Vec::new();
        for space in spaces {
            let s = seen.remove(&i64::from(space.base)).unwrap_or_default();
            let (active, waiting) = ctx.pools.group_demand(&space.group);
            let need = Need {
                busy: (active + waiting).min(space.size),
                fair: fleet::fair_share(space.size, members, rank),
                spare: 0,
                overhead: 0,
                // A reservation is held only for the demand here.
                give_idle: space.reservation,
            };
            let plan = self.step(limit, space.base, space.size, &s, need).await?;
            plans.push((space, plan));
        }

        // The pools' shares first, then the slots over them (a cap's once its lent connections fit).
        let mut shares: HashMap<&str, crate::pool::GroupShare> = HashMap::new();
        for (space, plan) in &plans {
            let share = shares.entry(space.group.as_str()).or_default();
            if space.reservation {
                share.reserved = Some(plan.target);
            } else {
                share.max_connections = Some(plan.target);
            }
        }
        let shares: Vec<(&str, crate::pool::GroupShare)> = shares.into_iter().collect();
        ctx.pools.set_group_shares(&shares);
        for (space, plan) in &mut plans {
            let in_use = if space.reservation {
                0
            } else {
                ctx.pools.group_demand(&space.group).0
            };
            self.give_back(limit, plan, in_use).await?;
        }
        Ok(())
    }

    /// Leaves once the pools are drained: waits for their connections to be gone on the
    /// server, then frees every slot by ending the session.
    async fn leave(&mut self, ctx: &Context, cfg: &Config) -> Result<(), FleetError> {
        ctx.pools.set_budget(0);
        let deadline = tokio::time::Instant::now() + crate::server::GONE_WAIT;
        while ctx.pools.demand().2 > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = self
            .timed(
                cfg.fleet_dead_after,
                self.client
                    .query_one("SELECT pg_advisory_unlock_all()", &[]),
            )
            .await;
        tracing::info!(fleet = %self.name, instance = self.id, "left the fleet");
        Ok(())
    }
}
