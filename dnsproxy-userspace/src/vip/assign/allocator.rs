//! Auto-allocated virtual IPs for `ServiceEntry` hosts: one index per host gives one IPv4
//! in 240.240.0.0/16 and one IPv6 in `2001:2::/48`. An address never moves while its
//! host exists: existing assignments are kept (and persisted, so they survive a daemon
//! restart), new hosts take a slot derived from a stable hash of their name (probing
//! past taken slots), so adding or removing other entries reshuffles nothing (unlike
//! Istio's allocator, istio#44837) and the same set of hosts gets the same addresses.
use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use super::state_file::{self, SLOTS};
use crate::registry::table::Vips;

/// What one allocation did beside giving slots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Allocated {
    /// Hosts moved because a declared address claimed their slot.
    pub moved: u64,
    /// Hosts left without a VIP: every slot is taken. They are forwarded to upstream
    /// DNS like hosts without addresses; everything else (Services, the other hosts)
    /// is still built.
    pub unallocated: usize,
}

/// The addresses of `slot`: `240.240.a.b` and `2001:2::ab`.
fn vips_of(slot: u32) -> Vips {
    let [_, _, hi, lo] = slot.to_be_bytes();
    Vips {
        v4: Ipv4Addr::new(240, 240, hi, lo),
        v6: Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, slot as u16),
    }
}

/// The slot of an address inside the ranges, if it is one.
fn slot_of(ip: IpAddr) -> Option<u32> {
    let slot = match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            (o[0] == 240 && o[1] == 240).then(|| u32::from(o[2]) << 8 | u32::from(o[3]))?
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            (s[..7] == [0x2001, 2, 0, 0, 0, 0, 0]).then_some(u32::from(s[7]))?
        }
    };
    (1..=SLOTS).contains(&slot).then_some(slot)
}

/// Host → slot, kept across restarts in `state_path`.
#[derive(Debug)]
pub struct VipAllocator {
    hosts: BTreeMap<String, u32>,
    state_path: Option<PathBuf>,
    /// Allocations moved because a declared address claimed their slot.
    moved: u64,
    /// Hosts of the last allocation left without a VIP.
    unallocated: usize,
}

/// Makes `hosts` (host → slot) cover exactly `wanted`: hosts no longer wanted go; a
/// host whose slot a `reserved` (declared) address claims moves, so that two hosts
/// never share a VIP; new hosts take the slot of a stable hash of their name, probing
/// past taken ones; when every slot is taken, a new host is skipped (and counted).
pub fn allocate(
    hosts: &mut BTreeMap<String, u32>,
    wanted: &BTreeSet<String>,
    reserved: &HashSet<IpAddr>,
) -> Allocated {
    hosts.retain(|host, _| wanted.contains(host));
    let reserved_slots: HashSet<u32> = reserved.iter().filter_map(|ip| slot_of(*ip)).collect();
    let claimed: Vec<String> = hosts
        .iter()
        .filter(|(_, slot)| reserved_slots.contains(slot))
        .map(|(host, _)| host.clone())
        .collect();
    for host in &claimed {
        let slot = hosts.remove(host).unwrap_or_default();
        tracing::warn!(%host, vip = %vips_of(slot).v4, "a declared address claims this auto-allocated VIP: the host moves to a free one");
    }
    let mut taken: HashSet<u32> = hosts.values().copied().collect();
    taken.extend(&reserved_slots);
    let mut skipped: Vec<&String> = Vec::new();
    for host in wanted {
        if hosts.contains_key(host) {
            continue;
        }
        if taken.len() >= SLOTS as usize {
            skipped.push(host);
            continue;
        }
        let start = (stable_hash(host) % u64::from(SLOTS)) as u32;
        if let Some(slot) = (0..SLOTS)
            .map(|i| (start + i) % SLOTS + 1)
            .find(|s| !taken.contains(s))
        {
            taken.insert(slot);
            hosts.insert(host.clone(), slot);
        }
    }
    if let Some(first) = skipped.first() {
        tracing::warn!(
            unallocated = skipped.len(),
            first = %first,
            "every auto-allocated VIP is taken ({SLOTS}): these hosts get none and are forwarded to upstream DNS"
        );
    }
    Allocated {
        moved: claimed.len() as u64,
        unallocated: skipped.len(),
    }
}

/// Of the store's `slots`, the moves of hosts that were agreed at a slot before (`last`)
/// and are still `wanted`, that no `reserved` (declared) address explains: a node
/// that rewrites the store (or a compromised one) cannot swap two hosts' VIPs, or move
/// one, under every other node's clients. Those hosts keep their slot; a host the
/// store put on one of those slots loses it (and is allocated again). Returns how many
/// moves were refused.
pub fn refuse_moves(
    slots: &mut BTreeMap<String, u32>,
    last: &BTreeMap<String, u32>,
    wanted: &BTreeSet<String>,
    reserved: &HashSet<IpAddr>,
) -> usize {
    let claimed = |slot: u32| {
        let vips = vips_of(slot);
        reserved.contains(&IpAddr::V4(vips.v4)) || reserved.contains(&IpAddr::V6(vips.v6))
    };
    let moved: Vec<(&String, u32)> = last
        .iter()
        .filter(|(host, was)| {
            wanted.contains(*host) && slots.get(*host) != Some(*was) && !claimed(**was)
        })
        .map(|(host, was)| (host, *was))
        .collect();
    if moved.is_empty() {
        return 0;
    }
    let kept: HashSet<u32> = moved.iter().map(|(_, was)| *was).collect();
    slots.retain(|_, slot| !kept.contains(slot));
    for (host, was) in &moved {
        tracing::warn!(%host, vip = %vips_of(*was).v4, store = ?slots.get(*host).map(|s| vips_of(*s).v4), "the VIP store moved a host in use, without a declared address claiming its VIP: refused, the host keeps its VIP");
        slots.insert((*host).clone(), *was);
    }
    moved.len()
}

/// FNV-1a: stable across builds and runs, unlike the standard library's hasher.
fn stable_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl VipAllocator {
    /// An allocator without persistence (tests, fuzzing).
    pub fn in_memory() -> Self {
        VipAllocator {
            hosts: BTreeMap::new(),
            state_path: None,
            moved: 0,
            unallocated: 0,
        }
    }

    /// Loads `state_dir/vips.json` if present. A damaged file is no reason not to
    /// start: what it still holds is kept (those hosts keep their VIPs), the rest is
    /// allocated again, and a warning names the file.
    pub fn load(state_dir: &Path) -> Self {
        let path = state_dir.join("vips.json");
        let loaded = state_file::read(&path);
        if let Some(damage) = &loaded.damage {
            tracing::warn!(
                path = %path.display(),
                kept = loaded.hosts.len(),
                error = %crate::report(damage),
                "the VIP state file is damaged: keeping the allocations it still holds"
            );
        }
        VipAllocator {
            hosts: loaded.hosts,
            state_path: Some(path),
            moved: 0,
            unallocated: 0,
        }
    }

    /// Makes the allocation cover exactly `wanted` hosts; `reserved` addresses (given
    /// by users or by Istio) are never handed out. Returns host → VIPs.
    pub fn sync(
        &mut self,
        wanted: &BTreeSet<String>,
        reserved: &HashSet<IpAddr>,
    ) -> BTreeMap<String, Vips> {
        let before = self.hosts.clone();
        let done = allocate(&mut self.hosts, wanted, reserved);
        self.moved += done.moved;
        self.unallocated = done.unallocated;
        if self.hosts != before {
            self.persist();
        }
        self.hosts
            .iter()
            .map(|(h, s)| (h.clone(), vips_of(*s)))
            .collect()
    }

    /// Hosts the last allocation left without a VIP (every slot taken).
    pub fn unallocated(&self) -> usize {
        self.unallocated
    }

    /// Host → slot, as allocated now.
    pub fn slots(&self) -> &BTreeMap<String, u32> {
        &self.hosts
    }

    /// Takes the allocation agreed with the other daemons (node mode's cluster store);
    /// the local file keeps it as a cache.
    pub fn adopt(&mut self, hosts: BTreeMap<String, u32>) {
        if hosts != self.hosts {
            self.hosts = hosts;
            self.persist();
        }
    }

    /// Allocations moved so far because a declared address claimed their VIP.
    pub fn moved(&self) -> u64 {
        self.moved
    }

    /// Writes the state atomically and durably. A failure is logged, not fatal:
    /// allocations stay valid in memory and are written again on the next change.
    fn persist(&self) {
        let Some(path) = &self.state_path else {
            return;
        };
        if let Err(e) = state_file::write(path, &self.hosts) {
            tracing::warn!(path = %path.display(), error = %crate::report(&e), "cannot persist VIP allocations");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(hosts: &[&str]) -> BTreeSet<String> {
        hosts.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn hosts_past_the_last_free_slot_are_skipped_and_the_rest_allocated() {
        let wanted: BTreeSet<String> = (0..SLOTS + 6).map(|i| format!("h{i}.example")).collect();
        let reserved: HashSet<IpAddr> = [IpAddr::V4(Ipv4Addr::new(240, 240, 0, 7))].into();
        let mut a = VipAllocator::in_memory();
        let got = a.sync(&wanted, &reserved);
        assert_eq!(
            got.len(),
            SLOTS as usize - 1,
            "every slot but the declared one"
        );
        assert_eq!(a.unallocated(), 7);
        let distinct: HashSet<Ipv4Addr> = got.values().map(|v| v.v4).collect();
        assert_eq!(distinct.len(), got.len(), "no VIP shared");
        assert!(!distinct.contains(&Ipv4Addr::new(240, 240, 0, 7)));
        // Hosts go: the skipped ones get the freed slots, nobody else moves.
        let fewer: BTreeSet<String> = wanted.iter().skip(10).cloned().collect();
        let again = a.sync(&fewer, &reserved);
        assert_eq!(a.unallocated(), 0);
        assert!(got.iter().all(|(h, v)| again.get(h).is_none_or(|w| w == v)));
    }

    #[test]
    fn a_store_that_swaps_or_moves_hosts_in_use_is_not_followed() {
        let map = |pairs: &[(&str, u32)]| -> BTreeMap<String, u32> {
            pairs.iter().map(|(h, s)| ((*h).to_owned(), *s)).collect()
        };
        let last = map(&[("a", 1), ("b", 2), ("c", 3), ("gone", 4)]);
        let wanted = set(&["a", "b", "c", "new"]);
        // a and b swapped, c moved onto 9, new put on c's slot, gone's slot reused.
        let mut slots = map(&[("a", 2), ("b", 1), ("c", 9), ("new", 3), ("x", 4)]);
        let refused = refuse_moves(&mut slots, &last, &wanted, &HashSet::new());
        assert_eq!(refused, 3);
        assert_eq!(slots, map(&[("a", 1), ("b", 2), ("c", 3), ("x", 4)]));
        // A declared address claiming a's slot: that move stands.
        let reserved: HashSet<IpAddr> = [IpAddr::V4(vips_of(1).v4)].into();
        let mut slots = map(&[("a", 5), ("b", 2), ("c", 3)]);
        assert_eq!(refuse_moves(&mut slots, &last, &wanted, &reserved), 0);
        assert_eq!(slots["a"], 5);
    }

    #[test]
    fn addresses_are_in_range_and_paired() {
        let mut a = VipAllocator::in_memory();
        let got = a.sync(&set(&["aliyun.com", "alibabacloud.com"]), &HashSet::new());
        for vips in got.values() {
            assert_eq!(&vips.v4.octets()[..2], &[240, 240]);
            assert_eq!(&vips.v6.segments()[..2], &[0x2001, 2]);
            assert_eq!(slot_of(IpAddr::V4(vips.v4)), slot_of(IpAddr::V6(vips.v6)));
        }
        assert_ne!(got["aliyun.com"], got["alibabacloud.com"]);
    }

    #[test]
    fn stable_under_churn_and_deterministic() {
        let mut a = VipAllocator::in_memory();
        let first = a.sync(&set(&["a.com", "b.com", "c.com"]), &HashSet::new());
        // Remove one, add others: the survivors keep their addresses.
        let second = a.sync(&set(&["a.com", "c.com", "d.com", "e.com"]), &HashSet::new());
        assert_eq!(first["a.com"], second["a.com"]);
        assert_eq!(first["c.com"], second["c.com"]);
        // The same set on a fresh allocator gets the same addresses.
        let mut fresh = VipAllocator::in_memory();
        let again = fresh.sync(&set(&["a.com", "b.com", "c.com"]), &HashSet::new());
        assert_eq!(first, again);
    }

    #[test]
    fn a_host_whose_vip_is_claimed_later_moves() {
        let mut a = VipAllocator::in_memory();
        let first = a.sync(&set(&["x.com", "y.com"]), &HashSet::new());
        let claimed: HashSet<IpAddr> = [IpAddr::V4(first["x.com"].v4)].into();
        let second = a.sync(&set(&["x.com", "y.com"]), &claimed);
        assert_ne!(second["x.com"], first["x.com"], "x.com moved");
        assert_eq!(second["y.com"], first["y.com"], "y.com untouched");
        assert_eq!(a.moved(), 1);
    }

    #[test]
    fn reserved_and_colliding_slots_are_skipped() {
        let mut a = VipAllocator::in_memory();
        let natural = a.sync(&set(&["x.com"]), &HashSet::new())["x.com"];
        let mut b = VipAllocator::in_memory();
        let reserved: HashSet<IpAddr> = [IpAddr::V4(natural.v4)].into();
        let moved = b.sync(&set(&["x.com"]), &reserved)["x.com"];
        assert_ne!(natural, moved);
    }

    #[test]
    fn survives_a_restart_through_the_state_file() {
        let dir = std::env::temp_dir().join(format!("vips-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut a = VipAllocator::load(&dir);
        let first = a.sync(&set(&["b.com"]), &HashSet::new());
        // A new process, where a.com arrives first and could hash onto b.com's slot:
        // the state file keeps b.com where it was.
        let mut b = VipAllocator::load(&dir);
        let second = b.sync(&set(&["a.com", "b.com"]), &HashSet::new());
        assert_eq!(first["b.com"], second["b.com"]);
        // Truncated: b.com's line survives, and so does its VIP.
        let text = std::fs::read_to_string(dir.join("vips.json")).unwrap();
        let cut = text.find("b.com").unwrap();
        let cut = cut + text[cut..].find('\n').unwrap() + 1;
        std::fs::write(dir.join("vips.json"), &text[..cut]).unwrap();
        let mut c = VipAllocator::load(&dir);
        let third = c.sync(&set(&["b.com", "a.com"]), &HashSet::new());
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(second, third);
    }
}
