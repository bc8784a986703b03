//! Keeps `dp_vips`/`dp_services` equal to the plan: follows registry changes, resolves
//! DNS-resolution hosts upstream (A and AAAA) and re-resolves each name before its TTL
//! runs out, never sooner than the refresh floor (`--dns-refresh-floor-secs`, with
//! jitter) nor later than [`MAX_REFRESH`]; at most `--dns-refresh-concurrency` names at
//! once; a failure is retried with exponential backoff. Services are written before
//! their VIP appears and removed after it goes, each value whole.
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use aya::maps::HashMap as BpfHashMap;
use dnsproxy_common::{ServiceKey, ServiceValue, VipInfo, VipKey, map_names};
use hickory_proto::{
    op::{Query, ResponseCode},
    rr::{Name, RData, RecordType},
};
use tokio::time::Instant;

use super::{
    Translated,
    plan::{
        Backends, Capacity, Plan, ServiceKeyOrd, backends_of, names_to_resolve, plan, service_value,
    },
    views::Views,
};
use crate::{
    bpf::{BpfError, map_err, pinned, to_map_addr},
    dns::{
        forwarder::{ForwardError, Forwarder},
        question::Relay,
    },
    registry::{
        Registry,
        table::{Shard, VipService},
    },
};

/// Shortest and longest time between two resolutions of a name, before the floor.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);
pub const MAX_REFRESH: Duration = Duration::from_mins(5);
/// When a name could not be resolved (or has no address), ask again after this,
/// doubled with each failure in a row up to [`MAX_REFRESH`].
const RETRY: Duration = Duration::from_secs(5);

/// How names are refreshed: at most `concurrency` lookups (two queries each) at once,
/// none sooner than `floor` after the last.
#[derive(Clone, Copy, Debug)]
pub struct Refresh {
    pub concurrency: usize,
    pub floor: Duration,
}

/// `d` spread by ±10%, so that names resolved together do not stay in step.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::random_range(0.9..1.1))
}

/// The wait after `failures` failures in a row: 5 s, 10 s, 20 s, ... 5 min.
fn backoff(failures: u32) -> Duration {
    RETRY
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(MAX_REFRESH)
}

/// What a name's backends are, per family, and when to ask again.
#[derive(Default)]
struct Resolved {
    v4: Vec<IpAddr>,
    v6: Vec<IpAddr>,
    refresh_at: Option<Instant>,
    /// Failures in a row (the backoff).
    failures: u32,
}

impl Resolved {
    fn addrs(&self) -> Vec<IpAddr> {
        self.v4.iter().chain(&self.v6).copied().collect()
    }
}

/// One family's lookup: its addresses and their smallest TTL when the upstream gave a
/// definitive answer (NOERROR, possibly empty, or NXDOMAIN); `None` when it failed
/// (timeout, SERVFAIL, ...), so that the family keeps its last good backends.
type Family = Option<(Vec<IpAddr>, u32)>;

/// Re-resolve a quarter of the TTL before it expires, within the bounds.
fn refresh_after(ttl: u32) -> Duration {
    Duration::from_secs(u64::from(ttl - ttl / 4)).clamp(MIN_REFRESH, MAX_REFRESH)
}

/// The task.
pub struct BackendSync {
    pub registry: Arc<Registry>,
    /// Where DNS learns what translates.
    pub translated: Arc<Translated>,
    pub forwarder: Arc<Forwarder>,
    pub pin_dir: PathBuf,
    /// How long a gone host's VIP keeps translating (twice the TTL clients are told).
    pub retire_after: Duration,
    /// What the maps hold at most.
    pub capacity: Capacity,
    pub refresh: Refresh,
    /// Node mode's namespaces with captured pods; `None` in local mode (one view).
    pub views: Option<Arc<Views>>,
}

/// Why a name's backends could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The name is not a valid DNS name.
    #[error("`{name}` is not a valid DNS name")]
    BadName {
        name: String,
        #[source]
        source: hickory_proto::ProtoError,
    },
    /// The upstreams failed for both A and AAAA (the A failure is the source).
    #[error("A and AAAA lookups failed")]
    Upstream(#[source] ForwardError),
}

/// A and AAAA lookups of `name`, each definitive or failed; an error when both failed.
async fn resolve(forwarder: &Forwarder, name: &str) -> Result<(Family, Family), ResolveError> {
    let fqdn = Name::from_ascii(format!("{name}.")).map_err(|source| ResolveError::BadName {
        name: name.to_owned(),
        source,
    })?;
    let (qa, qaaaa) = (
        Query::query(fqdn.clone(), RecordType::A),
        Query::query(fqdn, RecordType::AAAA),
    );
    let relay = Relay::RECURSIVE;
    let (a, aaaa) = tokio::join!(
        forwarder.forward(&qa, &relay),
        forwarder.forward(&qaaaa, &relay)
    );
    let (a, aaaa) = match (a, aaaa) {
        (Err(e), Err(_)) => return Err(ResolveError::Upstream(e)),
        (a, aaaa) => (a.ok(), aaaa.ok()),
    };
    Ok((family(a.map(|f| f.reply)), family(aaaa.map(|f| f.reply))))
}

/// The addresses of a definitive answer; `None` for anything but NOERROR or NXDOMAIN.
fn family(reply: Option<hickory_proto::op::Message>) -> Family {
    let reply = reply?;
    if !matches!(
        reply.metadata.response_code,
        ResponseCode::NoError | ResponseCode::NXDomain
    ) {
        return None;
    }
    let mut ttl = u32::MAX;
    let addrs = reply
        .answers
        .iter()
        .filter_map(|r| {
            let ip = match &r.data {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(a) => IpAddr::V6(a.0),
                _ => return None,
            };
            ttl = ttl.min(r.ttl);
            Some(ip)
        })
        .collect();
    Some((addrs, ttl))
}

/// What the maps hold now (an adopted daemon's translations, or nothing), so that the
/// first write also removes what is no longer wanted.
fn read_current(pin_dir: &std::path::Path) -> Result<Plan, BpfError> {
    let services: BpfHashMap<_, ServiceKey, ServiceValue> =
        pinned::open_hash(pin_dir, map_names::SERVICES)?;
    let vips: BpfHashMap<_, VipKey, VipInfo> = pinned::open_hash(pin_dir, map_names::VIPS)?;
    let mut plan = Plan::default();
    for (k, v) in services.iter().filter_map(Result::ok) {
        plan.services.insert(ServiceKeyOrd::of(&k), backends_of(&v));
    }
    for (k, v) in vips.iter().filter_map(Result::ok) {
        plan.vips.insert(crate::bpf::from_map_addr(&k.addr), v);
    }
    Ok(plan)
}

/// Applies the difference between `old` and `new` to the pinned maps.
fn write(pin_dir: &std::path::Path, old: &Plan, new: &Plan) -> Result<(), BpfError> {
    let mut services: BpfHashMap<_, ServiceKey, ServiceValue> =
        pinned::open_hash(pin_dir, map_names::SERVICES)?;
    let mut vips: BpfHashMap<_, VipKey, VipInfo> = pinned::open_hash(pin_dir, map_names::VIPS)?;
    // The filter first: the data path skips a destination whose bucket is unmarked.
    // VIPs already in the maps were marked when they came (or, adopted, at start).
    let added = new.vips.keys().filter(|vip| !old.vips.contains_key(*vip));
    pinned::mark_vips(pin_dir, added.map(|vip| to_map_addr(*vip)))?;
    for (key, value) in &new.services {
        if old.services.get(key) != Some(value) {
            services
                .insert(key.key(), service_value(value), 0)
                .map_err(map_err(map_names::SERVICES))?;
        }
    }
    for (vip, info) in &new.vips {
        if old.vips.get(vip) != Some(info) {
            vips.insert(
                VipKey {
                    addr: to_map_addr(*vip),
                },
                *info,
                0,
            )
            .map_err(map_err(map_names::VIPS))?;
        }
    }
    for vip in old.vips.keys().filter(|v| !new.vips.contains_key(v)) {
        vips.remove(&VipKey {
            addr: to_map_addr(*vip),
        })
        .map_err(map_err(map_names::VIPS))?;
    }
    for key in old
        .services
        .keys()
        .filter(|k| !new.services.contains_key(k))
    {
        services
            .remove(&key.key())
            .map_err(map_err(map_names::SERVICES))?;
    }
    Ok(())
}

/// A VIP whose host is gone, still translated until `until`: clients hold the name
/// for its TTL, twice over to be safe.
struct Retired {
    info: VipInfo,
    services: Vec<(ServiceKeyOrd, Backends)>,
    until: Instant,
}

/// What the sync loop keeps between rounds.
struct SyncState {
    resolved: HashMap<String, Resolved>,
    /// What the maps hold.
    written: Plan,
    retired: HashMap<IpAddr, Retired>,
}

impl SyncState {
    /// The next time something is due: a refresh, or the end of a retirement.
    fn next_wake(&self) -> Option<Instant> {
        let refresh = self.resolved.values().filter_map(|r| r.refresh_at);
        let retire = self.retired.values().map(|r| r.until);
        refresh.chain(retire).min()
    }

    /// Adds the VIPs still in their grace period to `desired`; starts the grace period
    /// of VIPs that left it, and ends those that are over or whose VIP is wanted again.
    /// A VIP in `refused` (an address an entry may no longer declare: someone else's)
    /// gets no grace: it stops translating at once.
    fn keep_retired(
        &mut self,
        desired: &mut Plan,
        (grace, refused): (Duration, &HashSet<IpAddr>),
        now: Instant,
    ) {
        for (vip, info) in &self.written.vips {
            if desired.vips.contains_key(vip)
                || self.retired.contains_key(vip)
                || refused.contains(vip)
            {
                continue;
            }
            // The services of one VIP are adjacent: keys order by VIP first.
            let services = self
                .written
                .services
                .range(ServiceKeyOrd::first_of(*vip)..=ServiceKeyOrd::last_of(*vip))
                .map(|(k, v)| (*k, v.clone()))
                .collect();
            tracing::info!(%vip, ?grace, "VIP host gone: still translated for twice the DNS TTL");
            let until = now + grace;
            self.retired.insert(
                *vip,
                Retired {
                    info: *info,
                    services,
                    until,
                },
            );
        }
        self.retired.retain(|vip, r| {
            r.until > now && !desired.vips.contains_key(vip) && !refused.contains(vip)
        });
        for (vip, r) in &self.retired {
            desired.vips.insert(*vip, r.info);
            desired.services.extend(r.services.iter().cloned());
        }
    }
}

impl BackendSync {
    /// Runs until the task is dropped; `first_sync` fires after the first write.
    pub async fn run(self, first_sync: tokio::sync::oneshot::Sender<()>) {
        let mut changes = self.registry.subscribe();
        let mut view_changes = self.views.as_ref().map(|v| v.subscribe());
        let written = read_current(&self.pin_dir).unwrap_or_else(|e| {
            tracing::warn!(
                "cannot read the VIP translation maps: {}",
                crate::report(&e)
            );
            Plan::default()
        });
        let mut state = SyncState {
            resolved: HashMap::new(),
            written,
            retired: HashMap::new(),
        };
        let mut first = Some(first_sync);
        // The entries' shard planned last: a table change that kept it (a Service
        // changed) changes no VIP, and is not planned again.
        let mut planned: Option<Arc<Shard>> = None;
        loop {
            changes.borrow_and_update();
            let views_changed = view_changes
                .as_mut()
                .is_some_and(|rx| rx.has_changed().unwrap_or(false));
            if let Some(rx) = view_changes.as_mut() {
                rx.borrow_and_update();
            }
            let table = self.registry.table();
            let same = !views_changed
                && planned
                    .as_ref()
                    .is_some_and(|p| Arc::ptr_eq(p, table.entries()));
            let due = state.next_wake().is_some_and(|at| at <= Instant::now());
            if !same || due {
                let services = table.vip_services();
                self.resolve_due(services, &mut state.resolved).await;
                let refused = table.refused().iter().filter_map(|r| r.address).collect();
                self.apply(services, &refused, &mut state);
                planned = Some(Arc::clone(table.entries()));
            }
            if let Some(tx) = first.take() {
                let _ = tx.send(());
            }
            if !next_round(&mut changes, view_changes.as_mut(), state.next_wake()).await {
                return;
            }
        }
    }

    /// Resolves the names that are new or due for a refresh, the longest due first, at
    /// most `--dns-refresh-concurrency` at once.
    async fn resolve_due(&self, services: &[VipService], resolved: &mut HashMap<String, Resolved>) {
        use std::sync::atomic::Ordering::Relaxed;
        let wanted: BTreeSet<String> = services.iter().flat_map(names_to_resolve).collect();
        resolved.retain(|name, _| wanted.contains(name));
        let now = Instant::now();
        let mut due: Vec<(Option<Instant>, &String)> = wanted
            .iter()
            .map(|n| (resolved.get(n).and_then(|r| r.refresh_at), n))
            .filter(|(at, _)| at.is_none_or(|at| at <= now))
            .collect();
        due.sort();
        let bound = self.refresh.concurrency.max(1);
        let counters = &self.translated.refresh;
        counters
            .deferred
            .fetch_add(due.len().saturating_sub(bound) as u64, Relaxed);
        let mut names = due.into_iter().map(|(_, n)| n.clone());
        let mut lookups = tokio::task::JoinSet::new();
        let spawn = |lookups: &mut tokio::task::JoinSet<_>, name: String| {
            let forwarder = Arc::clone(&self.forwarder);
            lookups.spawn(async move {
                let result = resolve(&forwarder, &name).await;
                (name, result)
            });
        };
        for name in names.by_ref().take(bound) {
            spawn(&mut lookups, name);
        }
        while let Some(joined) = lookups.join_next().await {
            if let Ok((name, result)) = joined {
                let outcome = record(resolved, &name, result, self.refresh.floor);
                match outcome {
                    Outcome::Failed => counters.failures.fetch_add(1, Relaxed),
                    Outcome::Floored => counters.floored.fetch_add(1, Relaxed),
                    Outcome::Resolved => 0,
                };
            }
            if let Some(name) = names.next() {
                spawn(&mut lookups, name);
            }
        }
    }

    /// Writes the plan for `services` (and the retired VIPs still in their grace
    /// period) when it differs from what the maps hold, then tells the registry which
    /// VIPs are translated, so DNS hands out no other.
    fn apply(&self, services: &[VipService], refused: &HashSet<IpAddr>, state: &mut SyncState) {
        let addrs: HashMap<String, Vec<IpAddr>> = state
            .resolved
            .iter()
            .map(|(n, r)| (n.clone(), r.addrs()))
            .collect();
        let views = self.views.as_ref().map(|v| v.list());
        let mut desired = plan(services, &addrs, views.as_deref());
        state.keep_retired(&mut desired, (self.retire_after, refused), Instant::now());
        let dropped = desired.fit(self.capacity);
        if dropped != self.translated.left_out() {
            tracing::warn!(
                left_out = dropped,
                max_vips = self.capacity.vips,
                max_services = self.capacity.services,
                "the VIP translation maps are full: the newest entries' VIPs do not translate; raise --max-vips / --max-vip-services"
            );
        }
        self.translated.set_left_out(dropped);
        self.translated.set_ipv6_backed(desired.ipv6_backed.clone());
        if !desired.same_maps(&state.written) {
            match write(&self.pin_dir, &state.written, &desired) {
                Ok(()) => {
                    tracing::info!(
                        vips = desired.vips.len(),
                        services = desired.services.len(),
                        "VIP translation maps updated"
                    );
                    state.written = desired;
                }
                Err(e) => tracing::error!(
                    "cannot update the VIP translation maps: {}",
                    crate::report(&e)
                ),
            }
        }
        self.translated
            .set_programmed(state.written.vips.keys().copied().collect());
    }
}

/// Keeps the outcome of one resolution. A family with a definitive answer takes its
/// addresses (none: NXDOMAIN or NODATA); a family whose lookup failed keeps its last
/// good ones, so an upstream glitch never takes backends away. No address at all: the
/// VIPs fail closed, and the name is asked again soon.
fn record(
    resolved: &mut HashMap<String, Resolved>,
    name: &str,
    result: Result<(Family, Family), ResolveError>,
    floor: Duration,
) -> Outcome {
    let now = Instant::now();
    let entry = resolved.entry(name.to_owned()).or_default();
    let had = !entry.v4.is_empty() || !entry.v6.is_empty();
    let (v4, v6) = match result {
        Ok(families) => families,
        Err(e) => {
            entry.failures = entry.failures.saturating_add(1);
            let wait = jitter(backoff(entry.failures));
            tracing::warn!(%name, error = %crate::report(&e), failures = entry.failures, ?wait, "cannot resolve VIP backends, keeping the last ones");
            entry.refresh_at = Some(now + wait);
            return Outcome::Failed;
        }
    };
    let mut ttl = u32::MAX;
    for (family, kept) in [(v4, &mut entry.v4), (v6, &mut entry.v6)] {
        match family {
            Some((addrs, t)) => {
                *kept = addrs;
                ttl = ttl.min(t);
            }
            None => {
                tracing::warn!(%name, "one address family failed upstream: keeping its last backends");
            }
        }
    }
    if entry.v4.is_empty() && entry.v6.is_empty() {
        if had || entry.refresh_at.is_none() {
            tracing::info!(%name, "no address for a VIP host: its VIPs fail closed");
        }
        entry.failures = entry.failures.saturating_add(1);
        entry.refresh_at = Some(now + jitter(backoff(entry.failures)));
        return Outcome::Failed;
    }
    entry.failures = 0;
    tracing::debug!(%name, v4 = ?entry.v4, v6 = ?entry.v6, ttl, "resolved VIP backends");
    let by_ttl = refresh_after(ttl);
    entry.refresh_at = Some(now + jitter(by_ttl.max(floor)));
    if by_ttl < floor {
        Outcome::Floored
    } else {
        Outcome::Resolved
    }
}

/// How one lookup ended, for the counters.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Resolved,
    /// Resolved, its TTL shorter than the floor.
    Floored,
    /// Failed, or no address: retried with backoff.
    Failed,
}

/// Waits for a registry change or the next refresh; false when the registry is gone.
async fn next_round(
    changes: &mut tokio::sync::watch::Receiver<u64>,
    views: Option<&mut tokio::sync::watch::Receiver<u64>>,
    next: Option<Instant>,
) -> bool {
    let refresh = async {
        match next {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    let views = async {
        match views {
            // A closed channel (the capture gone) changes nothing more.
            Some(rx) => {
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        changed = changes.changed() => changed.is_ok(),
        () = views => true,
        () = refresh => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_family_keeps_its_last_backends_and_only_a_definitive_answer_empties_it() {
        let v4 = |s: &str| -> IpAddr { s.parse().unwrap() };
        let mut resolved = HashMap::new();
        let both = Ok((
            Some((vec![v4("192.0.2.1")], 60)),
            Some((vec![v4("2001:db8::1")], 60)),
        ));
        record(&mut resolved, "h", both, Duration::ZERO);
        assert_eq!(resolved["h"].addrs().len(), 2);
        // AAAA times out (or SERVFAIL): its last backend stays; A is updated.
        record(
            &mut resolved,
            "h",
            Ok((Some((vec![v4("192.0.2.2")], 60)), None)),
            Duration::ZERO,
        );
        assert_eq!(resolved["h"].addrs(), [v4("192.0.2.2"), v4("2001:db8::1")]);
        // Both fail: nothing changes.
        let upstream_down = Err(ResolveError::Upstream(ForwardError::NoUpstream));
        record(&mut resolved, "h", upstream_down, Duration::ZERO);
        assert_eq!(resolved["h"].addrs(), [v4("192.0.2.2"), v4("2001:db8::1")]);
        // A definitive NODATA for AAAA empties that family only.
        record(
            &mut resolved,
            "h",
            Ok((Some((vec![v4("192.0.2.2")], 60)), Some((vec![], 0)))),
            Duration::ZERO,
        );
        assert_eq!(resolved["h"].addrs(), [v4("192.0.2.2")]);
    }

    #[test]
    fn refresh_before_ttl_expiry_within_bounds() {
        assert_eq!(refresh_after(60), Duration::from_secs(45));
        assert_eq!(refresh_after(2), Duration::from_secs(2));
        assert_eq!(refresh_after(0), MIN_REFRESH);
        assert_eq!(refresh_after(86_400), MAX_REFRESH);
    }

    #[test]
    fn a_short_ttl_waits_for_the_floor_and_failures_back_off() {
        let ok = |ttl| Ok((Some((vec!["192.0.2.1".parse().unwrap()], ttl)), None));
        let floor = Duration::from_secs(30);
        let mut resolved = HashMap::new();
        let until = |r: &HashMap<String, Resolved>| r["h"].refresh_at.unwrap() - Instant::now();
        // TTL 1: refreshed after the floor (±10%), not after a second.
        assert_eq!(record(&mut resolved, "h", ok(1), floor), Outcome::Floored);
        let wait = until(&resolved);
        assert!(
            wait > Duration::from_secs(26) && wait <= Duration::from_secs(33),
            "{wait:?}"
        );
        // A long TTL is kept as it is.
        assert_eq!(
            record(&mut resolved, "h", ok(120), floor),
            Outcome::Resolved
        );
        assert!(until(&resolved) > Duration::from_secs(80));
        // Failures in a row: 5 s, 10 s, 20 s, ... up to 5 min, each ±10%.
        let mut waits = Vec::new();
        for _ in 0..8 {
            let down = Err(ResolveError::Upstream(ForwardError::NoUpstream));
            assert_eq!(record(&mut resolved, "h", down, floor), Outcome::Failed);
            waits.push(until(&resolved).as_secs_f64().round() as u64);
        }
        for (got, want) in waits.iter().zip([5u64, 10, 20, 40, 80, 160, 300, 300]) {
            let (lo, hi) = (want * 9 / 10, want * 11 / 10 + 1);
            assert!((lo..=hi).contains(got), "{waits:?}");
        }
        // A success ends the backoff.
        record(&mut resolved, "h", ok(120), floor);
        assert_eq!(resolved["h"].failures, 0);
        assert_eq!(backoff(1), RETRY);
        assert_eq!(backoff(u32::MAX), MAX_REFRESH);
    }
}
