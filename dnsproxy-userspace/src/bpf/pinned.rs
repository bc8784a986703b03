//! Reading and removing pinned state: used by `dnsproxy maps`, `dnsproxy cleanup`,
//! `/metrics`, and the daemon's own start and stop.
use std::{net::IpAddr, path::Path};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use dnsproxy_common::{
    Config, DnsServer, NetnsPolicy, ServiceKey, ServiceValue, VipInfo, VipKey, map_names, stat,
};
use serde::Serialize;

use super::{BpfError, from_map_addr, map_err};
use crate::dns::Protocol;

/// Subdirectory of the pin directory holding the pinned links.
pub const LINKS_DIR: &str = "links";

pub fn open(pin_dir: &Path, name: &str) -> Result<Map, BpfError> {
    let path = pin_dir.join(name);
    let data = MapData::from_pin(&path).map_err(|source| BpfError::Pin {
        path: format!(
            "{} (is a dnsproxy daemon running, or were pins kept?)",
            path.display()
        ),
        source: source.into(),
    })?;
    Map::from_map_data(data).map_err(map_err(name))
}

/// A pinned hash map, typed.
pub fn open_hash<K: aya::Pod, V: aya::Pod>(
    pin_dir: &Path,
    name: &str,
) -> Result<HashMap<MapData, K, V>, BpfError> {
    HashMap::try_from(open(pin_dir, name)?).map_err(map_err(name))
}

/// The per-CPU counters, summed over CPUs, by name.
pub fn read_stats(pin_dir: &Path) -> Result<Vec<(&'static str, u64)>, BpfError> {
    let name = map_names::STATS;
    let stats: PerCpuArray<_, u64> =
        PerCpuArray::try_from(open(pin_dir, name)?).map_err(map_err(name))?;
    let mut out = Vec::with_capacity(stat::NAMES.len());
    for (index, counter) in stat::NAMES.iter().enumerate() {
        let values = stats.get(&(index as u32), 0).map_err(map_err(name))?;
        out.push((*counter, values.iter().sum()));
    }
    Ok(out)
}

/// Everything `dnsproxy maps` shows.
#[derive(Debug, Serialize)]
pub struct MapsDump {
    pub pin_dir: String,
    pub config: ConfigDump,
    pub dns_servers: Vec<IpAddr>,
    pub policy: Vec<PolicyDump>,
    pub counters: Counters,
    pub links: Vec<String>,
    pub vips: Vec<VipDump>,
    pub services: Vec<ServiceDump>,
}

/// One translated (VIP, port, protocol) in a view and its backends.
#[derive(Debug, Serialize)]
pub struct ServiceDump {
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: &'static str,
    /// 0: every namespace's; else one namespace's own (its pods' policy `view`).
    pub view: u32,
    /// The view's entry does not declare the port (view 0's does): left alone there.
    pub undeclared: bool,
    pub backends: Vec<std::net::SocketAddr>,
}

impl ServiceDump {
    /// A `dp_services` entry as read from the map, whatever its bytes: a count past
    /// the backends array shows the whole array.
    pub fn decode(key: &ServiceKey, value: &ServiceValue) -> Self {
        let undeclared = value.count == dnsproxy_common::PORT_UNDECLARED;
        let count = if undeclared { 0 } else { value.count as usize };
        ServiceDump {
            vip: from_map_addr(&key.addr),
            port: key.port,
            protocol: Protocol::from_ip_proto(key.protocol).as_str(),
            view: key.view,
            undeclared,
            backends: value.backends[..count.min(value.backends.len())]
                .iter()
                .map(|b| std::net::SocketAddr::new(from_map_addr(&b.addr), b.port))
                .collect(),
        }
    }
}

/// Counters in their declared order (a JSON object, name → value).
#[derive(Debug)]
pub struct Counters(pub Vec<(&'static str, u64)>);

impl Serialize for Counters {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (name, value) in &self.0 {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

#[derive(Debug, Serialize)]
pub struct ConfigDump {
    pub listen_port: u16,
    pub dns_port: u16,
    pub capture_all: bool,
    pub daemon_tgid: u32,
}

#[derive(Debug, Serialize)]
pub struct PolicyDump {
    pub netns_cookie: u64,
    pub capture_dns: bool,
    /// Its slot in `dp_listeners`.
    pub listener_slot: u32,
    /// Its namespace's view of the VIP translations.
    pub view: u32,
    /// Its pod has a sidecar proxy: the proxy's DNS is not captured, declared VIPs are
    /// left to the proxy.
    pub sidecar: bool,
}

/// One VIP and how many (port, protocol) services are declared on it.
#[derive(Debug, Serialize)]
pub struct VipDump {
    pub vip: IpAddr,
    pub ports: u32,
    /// Some namespace's view has services of its own on it.
    pub scoped: bool,
    /// An address an entry declares (or Istio allocated): a sidecar proxy knows it, so
    /// pods with one are not translated to it.
    pub declared: bool,
}

/// Marks the buckets of `addrs` in `dp_vip_filter` (set only: a bucket is never
/// cleared while pinned, so a VIP is never skipped). Call before adding them to
/// `dp_vips`.
pub fn mark_vips(
    pin_dir: &Path,
    addrs: impl IntoIterator<Item = dnsproxy_common::Addr>,
) -> Result<(), BpfError> {
    let name = map_names::VIP_FILTER;
    let mut filter: Array<_, u64> = Array::try_from(open(pin_dir, name)?).map_err(map_err(name))?;
    let mut words: std::collections::BTreeMap<u32, u64> = std::collections::BTreeMap::new();
    for addr in addrs {
        let bit = addr.vip_filter_bit();
        *words.entry(bit / 64).or_default() |= 1u64 << (bit % 64);
    }
    for (index, bits) in words {
        let word = filter.get(&index, 0).map_err(map_err(name))?;
        if word & bits != bits {
            filter.set(index, word | bits, 0).map_err(map_err(name))?;
        }
    }
    Ok(())
}

/// The data path's configuration (`dp_config`), as the running daemon wrote it.
pub fn read_config(pin_dir: &Path) -> Result<Config, BpfError> {
    let name = map_names::CONFIG;
    let config: Array<_, Config> = Array::try_from(open(pin_dir, name)?).map_err(map_err(name))?;
    config.get(&0, 0).map_err(map_err(name))
}

/// Reads every pinned map under `pin_dir`.
pub fn dump(pin_dir: &Path) -> Result<MapsDump, BpfError> {
    let cfg = read_config(pin_dir)?;

    let name = map_names::DNS_SERVERS;
    let servers: Array<_, DnsServer> =
        Array::try_from(open(pin_dir, name)?).map_err(map_err(name))?;
    let mut dns_servers: Vec<IpAddr> = servers
        .iter()
        .filter_map(Result::ok)
        .take_while(|slot| slot.enabled != 0)
        .map(|slot| from_map_addr(&slot.addr))
        .collect();
    dns_servers.sort();

    let policy_map: HashMap<_, u64, NetnsPolicy> = open_hash(pin_dir, map_names::POLICY)?;
    let mut policy: Vec<PolicyDump> = policy_map
        .iter()
        .filter_map(Result::ok)
        .map(|(cookie, p)| PolicyDump {
            netns_cookie: cookie,
            capture_dns: p.capture_dns != 0,
            listener_slot: p.listener_slot,
            view: p.view,
            sidecar: p.sidecar != 0,
        })
        .collect();
    policy.sort_by_key(|p| p.netns_cookie);

    let counters = Counters(read_stats(pin_dir)?);

    let vip_map: HashMap<_, VipKey, VipInfo> = open_hash(pin_dir, map_names::VIPS)?;
    let mut vips: Vec<VipDump> = vip_map
        .iter()
        .filter_map(Result::ok)
        .map(|(k, v)| VipDump {
            vip: from_map_addr(&k.addr),
            ports: v.ports,
            scoped: v.flags & dnsproxy_common::VIP_SCOPED != 0,
            declared: v.flags & dnsproxy_common::VIP_DECLARED != 0,
        })
        .collect();
    vips.sort_by_key(|v| v.vip);
    let service_map: HashMap<_, ServiceKey, ServiceValue> =
        open_hash(pin_dir, map_names::SERVICES)?;
    let mut services: Vec<ServiceDump> = service_map
        .iter()
        .filter_map(Result::ok)
        .map(|(k, v)| ServiceDump::decode(&k, &v))
        .collect();
    services.sort_by_key(|s| (s.vip, s.view, s.port, s.protocol));
    let mut links: Vec<String> = std::fs::read_dir(pin_dir.join(LINKS_DIR))
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    links.sort();

    Ok(MapsDump {
        pin_dir: pin_dir.display().to_string(),
        config: ConfigDump {
            listen_port: cfg.listen_port,
            dns_port: cfg.dns_port,
            capture_all: cfg.capture_all != 0,
            daemon_tgid: cfg.daemon_tgid,
        },
        dns_servers,
        policy,
        counters,
        links,
        vips,
        services,
    })
}

impl std::fmt::Display for MapsDump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "pin dir:     {}", self.pin_dir)?;
        let c = &self.config;
        writeln!(
            f,
            "config:      listen_port={} dns_port={} capture_all={} daemon_tgid={}",
            c.listen_port, c.dns_port, c.capture_all, c.daemon_tgid
        )?;
        let servers: Vec<String> = self.dns_servers.iter().map(ToString::to_string).collect();
        writeln!(f, "dns servers: {}", servers.join(", "))?;
        if self.policy.is_empty() {
            writeln!(f, "policy:      (no netns entries)")?;
        } else {
            writeln!(f, "policy:")?;
            for p in &self.policy {
                writeln!(
                    f,
                    "  netns cookie {:<20} capture_dns={} listener_slot={} view={} sidecar={}",
                    p.netns_cookie, p.capture_dns, p.listener_slot, p.view, p.sidecar
                )?;
            }
        }
        writeln!(f, "counters:")?;
        for (name, value) in &self.counters.0 {
            writeln!(f, "  {name:<14} {value}")?;
        }
        writeln!(f, "links:       {}", self.links.join(", "))?;
        let vips: Vec<String> = self
            .vips
            .iter()
            .map(|v| {
                let scoped = if v.scoped {
                    ", per-namespace views"
                } else {
                    ""
                };
                format!("{} ({} ports{scoped})", v.vip, v.ports)
            })
            .collect();
        writeln!(f, "vips:        {}", vips.join(", "))?;
        if self.services.is_empty() {
            return writeln!(f, "services:    (no VIP translations)");
        }
        writeln!(f, "services:")?;
        for s in &self.services {
            let vip = std::net::SocketAddr::new(s.vip, s.port);
            let backends: Vec<String> = s.backends.iter().map(ToString::to_string).collect();
            let backends = if s.undeclared {
                "(not declared in this view: left alone)".to_owned()
            } else if backends.is_empty() {
                "(no backend: fails closed)".to_owned()
            } else {
                backends.join(", ")
            };
            let view = match s.view {
                0 => String::new(),
                v => format!(" [view {v}]"),
            };
            writeln!(f, "  {vip}/{:<4}{view} -> {backends}", s.protocol)?;
        }
        Ok(())
    }
}

/// Removes pinned links (detaching them) and pinned maps under `pin_dir`; returns how
/// many pins were removed. Missing directories are not an error.
pub fn remove_pins(pin_dir: &Path) -> Result<usize, BpfError> {
    let mut removed = 0;
    for dir in [pin_dir.join(LINKS_DIR), pin_dir.to_path_buf()] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if path.is_dir() {
                continue;
            }
            std::fs::remove_file(&path).map_err(super::pin_err(&path))?;
            removed += 1;
        }
    }
    let _ = std::fs::remove_dir(pin_dir.join(LINKS_DIR));
    Ok(removed)
}
