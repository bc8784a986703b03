//! The name table: which host names dnsproxy answers itself, and with which addresses.
//! It is built from Kubernetes-style manifests (`manifest`) read from files (`files`);
//! the table does not know where its entries came from.
pub mod files;
pub mod manifest;

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

/// Addresses of one host name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostRecord {
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
}

/// Host name (lower case, no trailing dot) → its addresses.
#[derive(Clone, Debug, Default)]
pub struct NameTable {
    hosts: HashMap<String, HostRecord>,
}

/// Lower-cases and strips the trailing dot, the form table keys use.
pub fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl NameTable {
    /// Adds `addrs` to `host` (duplicates ignored).
    pub fn add(&mut self, host: &str, addrs: impl IntoIterator<Item = IpAddr>) {
        let record = self.hosts.entry(normalize(host)).or_default();
        for addr in addrs {
            match addr {
                IpAddr::V4(v4) if !record.v4.contains(&v4) => record.v4.push(v4),
                IpAddr::V6(v6) if !record.v6.contains(&v6) => record.v6.push(v6),
                _ => {}
            }
        }
    }

    /// The record for a query name (any case, trailing dot or not).
    pub fn lookup(&self, name: &str) -> Option<&HostRecord> {
        self.hosts.get(&normalize(name))
    }

    /// Number of host names.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// True when no host is known.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_ignores_case_and_trailing_dot() {
        let mut t = NameTable::default();
        t.add("Aliyun.com", ["240.240.0.1".parse().unwrap(), "2001:2::1".parse().unwrap()]);
        t.add("aliyun.com.", ["240.240.0.1".parse().unwrap()]);
        let r = t.lookup("ALIYUN.COM.").unwrap();
        assert_eq!(r.v4, ["240.240.0.1".parse::<Ipv4Addr>().unwrap()]);
        assert_eq!(r.v6, ["2001:2::1".parse::<Ipv6Addr>().unwrap()]);
        assert!(t.lookup("example.com").is_none());
        assert_eq!(t.len(), 1);
    }
}
