//! `--forwarded-allow-ips`: which peers may tell the guest, through `X-Forwarded-*`, the scheme,
//! host and client address the request really had.

use std::net::IpAddr;

use anyhow::{Context, Result};
use http::HeaderValue;
use hyper::HeaderMap;
use hyper::header::{FORWARDED, HOST};
use ipnet::IpNet;

pub const X_FORWARDED_PROTO: &str = "x-forwarded-proto";
pub const X_FORWARDED_PREFIX: &str = "x-forwarded-prefix";
const X_FORWARDED_HOST: &str = "x-forwarded-host";
const X_FORWARDED_FOR: &str = "x-forwarded-for";

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TrustedPeers {
    All,
    Networks(Vec<IpNet>),
}

/// What the guest is told about where a request came from.
#[derive(Debug, PartialEq, Eq)]
pub struct Origin {
    pub https: bool,
    /// The authority the client asked for, when a trusted proxy says it differs from `Host`.
    pub authority: Option<String>,
}

impl TrustedPeers {
    /// Every item is checked, so a typo beside `*` is refused rather than hidden by it.
    pub fn parse(list: &str) -> Result<TrustedPeers> {
        let mut networks = Vec::new();
        let mut all = false;
        for item in list
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
        {
            if item == "*" {
                all = true;
                continue;
            }
            let network = match item.parse::<IpNet>() {
                Ok(network) => network,
                Err(_) => IpNet::from(item.parse::<IpAddr>().with_context(|| {
                    format!("{item:?} is neither an IP address nor a CIDR network")
                })?),
            };
            networks.push(network);
        }
        Ok(if all {
            TrustedPeers::All
        } else {
            TrustedPeers::Networks(networks)
        })
    }

    pub fn trusts(&self, peer: IpAddr) -> bool {
        let peer = match peer {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(peer),
            v4 => v4,
        };
        match self {
            TrustedPeers::All => true,
            TrustedPeers::Networks(networks) => networks.iter().any(|net| net.contains(&peer)),
        }
    }

    /// Reads the proxy headers of a trusted peer, or strips them from an untrusted one, and makes
    /// `X-Forwarded-For` end with the peer's address either way. `peer` is `None` on a unix
    /// socket, whose peer is always the local machine and is trusted like a loopback proxy.
    pub fn resolve(&self, peer: Option<IpAddr>, headers: &mut HeaderMap) -> Origin {
        let trusted = peer.is_none_or(|peer| self.trusts(peer));
        if !trusted {
            headers.remove(X_FORWARDED_PROTO);
            headers.remove(X_FORWARDED_HOST);
            headers.remove(X_FORWARDED_FOR);
            headers.remove(FORWARDED);
            // The path prefix an app is mounted at (a WSGI app's SCRIPT_NAME): set by the host
            // for a mounted app, by a trusted proxy otherwise, never by a client.
            headers.remove(X_FORWARDED_PREFIX);
        }
        let https = trusted
            && headers
                .get(X_FORWARDED_PROTO)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|proto| proto.trim().eq_ignore_ascii_case("https"));
        let authority = if trusted {
            forwarded_host(headers)
        } else {
            None
        };
        if let Some(peer) = peer {
            append_forwarded_for(headers, peer);
        }
        if let Some(authority) = &authority
            && let Ok(value) = HeaderValue::from_str(authority)
        {
            headers.insert(HOST, value);
        }
        Origin { https, authority }
    }
}

impl TrustedPeers {
    /// The host a trusted proxy says the client asked for, without changing anything: what the
    /// request is routed by before the host adds its own headers.
    pub fn forwarded_host(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> Option<String> {
        peer.is_none_or(|peer| self.trusts(peer))
            .then(|| forwarded_host(headers))
            .flatten()
    }
}

/// The first host of `X-Forwarded-Host`, if it is a valid authority.
fn forwarded_host(headers: &HeaderMap) -> Option<String> {
    headers
        .get(X_FORWARDED_HOST)
        .and_then(|v| v.to_str().ok())
        .and_then(|hosts| hosts.split(',').next())
        .map(str::trim)
        .filter(|host| !host.is_empty() && host.parse::<http::uri::Authority>().is_ok())
        .map(str::to_owned)
}

/// A chain sent over several header lines is one list (RFC 9110 §5.3): the lines are joined in
/// order, so no hop a trusted proxy reported is lost.
fn append_forwarded_for(headers: &mut HeaderMap, peer: IpAddr) {
    let mut chain: Vec<&str> = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|hops| !hops.is_empty())
        .collect();
    let peer = peer.to_string();
    chain.push(&peer);
    let value = chain.join(", ");
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(X_FORWARDED_FOR, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (k.parse().unwrap(), v.parse().unwrap()))
            .collect()
    }

    #[test]
    fn trusted_peer_sets_scheme_and_authority() {
        let peers = TrustedPeers::parse("127.0.0.1,::1").unwrap();
        let mut h = headers(&[
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "example.com"),
        ]);
        let origin = peers.resolve(Some("127.0.0.1".parse().unwrap()), &mut h);
        assert_eq!(
            origin,
            Origin {
                https: true,
                authority: Some("example.com".into())
            }
        );
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    }

    #[test]
    fn untrusted_peer_loses_proxy_headers() {
        let peers = TrustedPeers::parse("10.0.0.0/8").unwrap();
        let mut h = headers(&[
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-for", "1.2.3.4"),
            ("forwarded", "for=1.2.3.4"),
        ]);
        let origin = peers.resolve(Some("192.168.1.9".parse().unwrap()), &mut h);
        assert_eq!(
            origin,
            Origin {
                https: false,
                authority: None
            }
        );
        assert_eq!(h["x-forwarded-for"], "192.168.1.9");
        assert!(h.get("x-forwarded-proto").is_none() && h.get("forwarded").is_none());
    }

    #[test]
    fn star_and_mapped_addresses() {
        assert!(
            TrustedPeers::parse("*")
                .unwrap()
                .trusts("8.8.8.8".parse().unwrap())
        );
        let peers = TrustedPeers::parse("127.0.0.1").unwrap();
        assert!(peers.trusts("::ffff:127.0.0.1".parse().unwrap()));
        assert!(TrustedPeers::parse("not-an-ip").is_err());
        assert!(TrustedPeers::parse("*,bogus").is_err());
        assert_eq!(
            TrustedPeers::parse("10.0.0.1, *").unwrap(),
            TrustedPeers::All
        );
    }

    #[test]
    fn a_chain_over_several_lines_keeps_every_hop() {
        let peers = TrustedPeers::parse("127.0.0.1").unwrap();
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", "1.1.1.1".parse().unwrap());
        h.append("x-forwarded-for", "2.2.2.2, 3.3.3.3".parse().unwrap());
        peers.resolve(Some("127.0.0.1".parse().unwrap()), &mut h);
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 3.3.3.3, 127.0.0.1");
    }
}
