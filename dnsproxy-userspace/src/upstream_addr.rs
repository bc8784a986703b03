//! `IP`, `IP:PORT` and `[IPv6]:PORT` upstream addresses (port 53 when omitted).
use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

/// An upstream DNS server address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpstreamAddr(pub SocketAddr);

impl FromStr for UpstreamAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Ok(Self(sa));
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Self(SocketAddr::new(ip, 53)));
        }
        Err(format!(
            "`{s}` is not IP, IP:PORT or [IPv6]:PORT (e.g. 10.96.0.10, 10.96.0.10:53, [fd00::10]:53)"
        ))
    }
}

impl fmt::Display for UpstreamAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_forms() {
        struct Case {
            input: &'static str,
            want: Option<&'static str>,
        }
        let cases = [
            Case {
                input: "10.96.0.10",
                want: Some("10.96.0.10:53"),
            },
            Case {
                input: "10.96.0.10:5353",
                want: Some("10.96.0.10:5353"),
            },
            Case {
                input: "fd00::10",
                want: Some("[fd00::10]:53"),
            },
            Case {
                input: "[fd00::10]:54",
                want: Some("[fd00::10]:54"),
            },
            Case {
                input: "dns.example",
                want: None,
            },
            Case {
                input: "10.96.0.10:99999",
                want: None,
            },
        ];
        for c in cases {
            let got = c.input.parse::<UpstreamAddr>().ok().map(|a| a.to_string());
            assert_eq!(got.as_deref(), c.want, "input {}", c.input);
        }
    }
}
