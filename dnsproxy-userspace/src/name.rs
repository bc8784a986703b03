//! DNS names, in one place: the normalised form the name table and the cache key on
//! (lower case, no trailing dot), fully qualified wire names, and reverse names.
//!
//! It sits beside `dns` and `registry` rather than inside either, because both use it
//! and neither may depend on the other for it.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::rr::Name;

/// Lower-cases and strips the trailing dot: the form table keys use.
pub fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// The normalised form of a wire name.
pub fn normalize_name(name: &Name) -> String {
    normalize(&name.to_ascii())
}

/// The fully qualified wire name of a normalised name (`a.example` → `a.example.`).
pub fn fqdn(name: &str) -> Option<Name> {
    Name::from_ascii(format!("{name}.")).ok()
}

/// The address a normalised reverse name (`d.c.b.a.in-addr.arpa`, nibbles
/// `.ip6.arpa`) stands for.
pub fn reverse_ip(name: &str) -> Option<IpAddr> {
    if let Some(rest) = name.strip_suffix(".in-addr.arpa") {
        let mut octets: Vec<u8> = rest
            .split('.')
            .map(|p| p.parse().ok())
            .collect::<Option<_>>()?;
        if octets.len() != 4 {
            return None;
        }
        octets.reverse();
        return Some(IpAddr::V4(Ipv4Addr::new(
            octets[0], octets[1], octets[2], octets[3],
        )));
    }
    let rest = name.strip_suffix(".ip6.arpa")?;
    let nibbles: Vec<u8> = rest
        .split('.')
        .map(|p| {
            (p.len() == 1)
                .then(|| u8::from_str_radix(p, 16).ok())
                .flatten()
        })
        .collect::<Option<_>>()?;
    if nibbles.len() != 32 {
        return None;
    }
    let mut octets = [0u8; 16];
    for (i, pair) in nibbles.rchunks(2).enumerate() {
        octets[i] = (pair[1] << 4) | pair[0];
    }
    Some(IpAddr::V6(Ipv6Addr::from(octets)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_forms() {
        assert_eq!(normalize("Aliyun.COM."), "aliyun.com");
        assert_eq!(normalize_name(&Name::from_ascii("A.b.").unwrap()), "a.b");
        assert_eq!(fqdn("a.b").unwrap().to_ascii(), "a.b.");
    }

    #[test]
    fn reverse_names() {
        assert_eq!(
            reverse_ip("5.0.240.240.in-addr.arpa"),
            Some("240.240.0.5".parse().unwrap())
        );
        let v6 = "5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.2.0.0.0.1.0.0.2.ip6.arpa";
        assert_eq!(reverse_ip(v6), Some("2001:2::5".parse().unwrap()));
        assert_eq!(reverse_ip("1.2.3.in-addr.arpa"), None);
        assert_eq!(reverse_ip("example.com"), None);
    }
}
