//! Who is calling: which tenant's webhook secret a request carries (compared
//! as SHA-256 digests in constant time; the secrets themselves are not kept)
//! and, for logs, the client address (`X-Forwarded-For` believed only from
//! `server.trusted_proxies`).

use std::net::IpAddr;

use reqwest::Url;
use subtle::ConstantTimeEq;
use warp::http::HeaderMap;

use crate::config::{Config, TenantConfig};
use crate::server::ClientAddr;

/// One tenant as the listener sees it: digests of its secrets (never the
/// secrets themselves) and what its document URLs must look like.
pub(super) struct TenantAuth {
    pub(super) name: String,
    digests: Vec<[u8; 32]>,
    pub(super) api_base: Url,
}

impl TenantAuth {
    /// Every configured tenant, in config order.
    pub(super) fn all(config: &Config) -> Vec<TenantAuth> {
        config
            .tenants
            .iter()
            .map(|t: &TenantConfig| TenantAuth {
                name: t.name.clone(),
                digests: t
                    .webhook_secrets
                    .iter()
                    .map(|s| sha256(s.expose().as_bytes()))
                    .collect(),
                api_base: t.api_base.clone(),
            })
            .collect()
    }
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Which tenant's secret matches, comparing against every configured secret
/// (no early exit) so timing reveals neither the tenant nor the prefix.
pub(super) fn authenticate(
    tenants: &[TenantAuth],
    provided: &[u8],
    path_tenant: Option<&str>,
) -> Option<usize> {
    let digest = sha256(provided);
    let mut found: Option<usize> = None;
    for (i, t) in tenants.iter().enumerate() {
        let mut any = subtle::Choice::from(0u8);
        for d in &t.digests {
            any |= d.ct_eq(&digest);
        }
        if bool::from(any) {
            found = Some(i);
        }
    }
    match (found, path_tenant) {
        (Some(i), Some(name)) if tenants[i].name != name => None,
        (f, _) => f,
    }
}

/// The client address for logs: `X-Forwarded-For` only from a trusted proxy.
pub(super) fn client_ip(
    config: &Config,
    peer: Option<ClientAddr>,
    headers: &HeaderMap,
) -> Option<IpAddr> {
    let peer_ip = peer.map(|p| p.0.ip())?;
    let trusted = config
        .server
        .trusted_proxies
        .iter()
        .any(|net| net.contains(peer_ip));
    if trusted {
        if let Some(ip) = headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .and_then(|v| v.trim().parse().ok())
        {
            return Some(ip);
        }
    }
    Some(peer_ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::TestResult;

    #[test]
    fn authenticate_respects_the_path_tenant() -> TestResult {
        let tenants = vec![
            TenantAuth {
                name: "a".into(),
                digests: vec![sha256(b"secret-a")],
                api_base: Url::parse("https://x")?,
            },
            TenantAuth {
                name: "b".into(),
                digests: vec![sha256(b"secret-b1"), sha256(b"secret-b2")],
                api_base: Url::parse("https://x")?,
            },
        ];
        assert_eq!(authenticate(&tenants, b"secret-b2", None), Some(1));
        assert_eq!(authenticate(&tenants, b"secret-b2", Some("b")), Some(1));
        assert_eq!(authenticate(&tenants, b"secret-b2", Some("a")), None);
        assert_eq!(authenticate(&tenants, b"nope", None), None);
        assert_eq!(authenticate(&tenants, b"secret-a", Some("zzz")), None);
        Ok(())
    }
}
