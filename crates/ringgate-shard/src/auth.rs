//! Who may connect, subscribe and publish: JWT checking at the upgrade and the
//! topic ACLs a token carries.
//!
//! A [`Verifier`] is made once from the configuration (an HS256 secret, or a
//! PEM public key: RS256, ES256 or EdDSA by the key's kind) and shared by every
//! shard. A token must be signed with exactly that algorithm (`alg: none` and
//! any other are refused), carry `exp` (in the future) and, when given,
//! satisfy `nbf`, `--auth-audience` and `--auth-issuer`; the clock leeway is
//! one second. Its claims become [`Claims`]: `sub`, `exp`, and the [`Acl`]:
//! `topics` (what the connection may subscribe to; none without the claim) and
//! `publish` (what it may publish to), each a list of exact names and
//! `prefix*` patterns. Verification uses `jsonwebtoken` (with pure-Rust
//! crypto): a well-kept crate, and no hot path (once per upgrade).

use std::sync::Arc;

use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::pubsub::{publish_allowed, valid_publish_pattern};

/// Seconds of clock difference tolerated for `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 1;
/// Patterns one claim may list (a token is a request header; this bounds the
/// work of checking a topic against it).
pub const ACL_PATTERNS_MAX: usize = 256;

/// Checks tokens; one per process, shared by the shards.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    algorithm: Algorithm,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Verifier({:?})", self.algorithm)
    }
}

impl Verifier {
    /// Tokens signed with HS256 and `secret`.
    pub fn hs256(secret: &[u8]) -> Result<Verifier, String> {
        let key = DecodingKey::from_secret(secret).map_err(|e| format!("the HS256 secret: {e}"))?;
        Ok(Verifier::new(key, Algorithm::HS256))
    }

    /// Tokens signed with the private half of a PEM public key: RS256 for an
    /// RSA key, ES256 for a P-256 key, EdDSA for an Ed25519 key.
    pub fn public_key(pem: &[u8]) -> Result<Verifier, String> {
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            return Ok(Verifier::new(key, Algorithm::RS256));
        }
        if let Ok(key) = DecodingKey::from_ec_pem(pem) {
            return Ok(Verifier::new(key, Algorithm::ES256));
        }
        if let Ok(key) = DecodingKey::from_ed_pem(pem) {
            return Ok(Verifier::new(key, Algorithm::EdDSA));
        }
        Err("not a PEM public key of RSA, P-256 (ES256) or Ed25519 (EdDSA)".into())
    }

    fn new(key: DecodingKey, algorithm: Algorithm) -> Verifier {
        let mut validation = Validation::new(algorithm);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp"]);
        Verifier {
            key,
            validation,
            algorithm,
        }
    }

    /// Requires `aud` to name `audience`.
    pub fn with_audience(mut self, audience: &str) -> Verifier {
        self.validation.set_audience(&[audience]);
        self.validation.validate_aud = true;
        self.validation.set_required_spec_claims(&["exp", "aud"]);
        self
    }

    /// Requires `iss` to be `issuer`.
    pub fn with_issuer(mut self, issuer: &str) -> Verifier {
        self.validation.set_issuer(&[issuer]);
        let mut required = vec!["exp", "iss"];
        if self.validation.validate_aud {
            required.push("aud");
        }
        self.validation.set_required_spec_claims(&required);
        self
    }

    /// The algorithm tokens must use.
    pub fn algorithm(&self) -> &'static str {
        match self.algorithm {
            Algorithm::HS256 => "HS256",
            Algorithm::RS256 => "RS256",
            Algorithm::ES256 => "ES256",
            Algorithm::EdDSA => "EdDSA",
            _ => unreachable!("only these are made"),
        }
    }

    /// The claims of a valid token, or a one-line reason it is not.
    pub fn verify(&self, token: &str) -> Result<Claims, String> {
        use jsonwebtoken::errors::ErrorKind;
        let data =
            decode::<Wire>(token, &self.key, &self.validation).map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => "the token has expired".to_string(),
                ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)".to_string(),
                ErrorKind::InvalidSignature => "bad token signature".to_string(),
                ErrorKind::InvalidAlgorithm => {
                    format!("the token must be signed with {}", self.algorithm())
                }
                ErrorKind::InvalidAudience => "the token's audience (aud) is not ours".to_string(),
                ErrorKind::InvalidIssuer => "the token's issuer (iss) is not ours".to_string(),
                ErrorKind::MissingRequiredClaim(c) => format!("the token has no \"{c}\" claim"),
                _ => format!("not a valid token: {e}"),
            })?;
        let wire = data.claims;
        Ok(Claims {
            sub: wire.sub.unwrap_or_default(),
            exp: wire.exp,
            acl: Arc::new(Acl {
                subscribe: patterns(wire.topics, "topics")?,
                publish: wire
                    .publish
                    .map(|p| patterns(Some(p), "publish"))
                    .transpose()?,
            }),
        })
    }
}

/// The claims ringgate reads.
#[derive(Deserialize)]
struct Wire {
    sub: Option<String>,
    exp: u64,
    topics: Option<Vec<String>>,
    publish: Option<Vec<String>>,
}

fn patterns(list: Option<Vec<String>>, claim: &str) -> Result<Box<[Box<str>]>, String> {
    let list = list.unwrap_or_default();
    if list.len() > ACL_PATTERNS_MAX {
        return Err(format!(
            "the \"{claim}\" claim lists more than {ACL_PATTERNS_MAX} patterns"
        ));
    }
    match list.iter().find(|p| !valid_publish_pattern(p)) {
        Some(bad) => Err(format!(
            "the \"{claim}\" claim has {bad:?}: not a topic name or a prefix* pattern"
        )),
        None => Ok(list.into_iter().map(String::into_boxed_str).collect()),
    }
}

/// What a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// Who it is (`sub`; empty without the claim), for logs and refreshes.
    pub sub: String,
    /// When it expires, in seconds since the Unix epoch.
    pub exp: u64,
    pub acl: Arc<Acl>,
}

/// The topics a connection may subscribe to and publish to.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Acl {
    subscribe: Box<[Box<str>]>,
    /// `None`: the token says nothing, `--client-publish` alone decides.
    publish: Option<Box<[Box<str>]>>,
}

impl Acl {
    pub fn may_subscribe(&self, topic: &str) -> bool {
        self.subscribe.iter().any(|p| publish_allowed(p, topic))
    }

    /// A `publish` claim narrows `--client-publish`, or stands in for it when
    /// that is off.
    pub fn may_publish(&self, topic: &str, client_publish: Option<&str>) -> bool {
        let by_flag = client_publish.map(|p| publish_allowed(p, topic));
        match &self.publish {
            None => by_flag == Some(true),
            Some(claim) => {
                by_flag != Some(false) && claim.iter().any(|p| publish_allowed(p, topic))
            }
        }
    }
}

/// `--allowed-origins`: which browser pages may open WebSockets here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origins {
    /// Exact origins (`https://app.example.com`), lowercase.
    exact: Vec<String>,
    /// `*.example.com` forms: (scheme or `None` for any, `.example.com`).
    suffixes: Vec<(Option<String>, String)>,
    /// Let requests without `Origin` in (non-browser clients).
    pub allow_missing: bool,
}

impl Origins {
    /// Parses a comma-separated list of `scheme://host[:port]` and
    /// `[scheme://]*.domain` forms.
    pub fn parse(list: &str, allow_missing: bool) -> Result<Origins, String> {
        let mut origins = Origins {
            exact: Vec::new(),
            suffixes: Vec::new(),
            allow_missing,
        };
        for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let lower = item.to_ascii_lowercase();
            let (scheme, host) = match lower.split_once("://") {
                Some((scheme, host)) => (Some(scheme.to_string()), host.to_string()),
                None => (None, lower.clone()),
            };
            if host.is_empty() || host.contains('/') {
                return Err(format!(
                    "--allowed-origins {item:?}: expected scheme://host[:port] or *.domain"
                ));
            }
            match host.strip_prefix('*') {
                Some(suffix)
                    if suffix.starts_with('.') && suffix.len() > 1 && !suffix.contains('*') =>
                {
                    origins.suffixes.push((scheme, suffix.to_string()))
                }
                Some(_) => {
                    return Err(format!(
                        "--allowed-origins {item:?}: a wildcard is *.domain"
                    ))
                }
                None if scheme.is_some() && !host.contains('*') => origins.exact.push(lower),
                None => {
                    return Err(format!(
                    "--allowed-origins {item:?}: an exact origin has its scheme (https://{host})"
                ))
                }
            }
        }
        if origins.exact.is_empty() && origins.suffixes.is_empty() {
            return Err("--allowed-origins lists no origin".into());
        }
        Ok(origins)
    }

    /// Whether a request's `Origin` (or its absence) is let in.
    pub fn allows(&self, origin: Option<&str>) -> bool {
        let Some(origin) = origin else {
            return self.allow_missing;
        };
        let origin = origin.to_ascii_lowercase();
        if self.exact.contains(&origin) {
            return true;
        }
        let Some((scheme, host)) = origin.split_once("://") else {
            return false;
        };
        let host = host.split(':').next().unwrap_or("");
        self.suffixes.iter().any(|(s, suffix)| {
            s.as_deref().is_none_or(|s| s == scheme)
                && host.len() > suffix.len()
                && host.ends_with(suffix.as_str())
        })
    }
}

impl Acl {
    /// An ACL granting `subscribe` (tests of other modules).
    #[cfg(test)]
    pub fn for_tests(subscribe: &[&str]) -> Acl {
        Acl {
            subscribe: subscribe.iter().map(|s| Box::from(*s)).collect(),
            publish: None,
        }
    }
}

/// Seconds since the Unix epoch now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether a `Sec-WebSocket-Protocol` entry looks like a raw JWT (three
/// base64url parts): how browsers, which cannot set headers, send a token.
pub fn looks_like_jwt(entry: &str) -> bool {
    entry.split('.').count() == 3
        && entry
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(subscribe: &[&str], publish: Option<&[&str]>) -> Acl {
        let boxed = |l: &[&str]| l.iter().map(|s| Box::from(*s)).collect();
        Acl {
            subscribe: boxed(subscribe),
            publish: publish.map(boxed),
        }
    }

    #[test]
    fn acls_match_names_and_prefixes() {
        let a = acl(&["user.42", "news.*"], None);
        assert!(a.may_subscribe("user.42"));
        assert!(a.may_subscribe("news.sport"));
        assert!(!a.may_subscribe("user.43"));
        assert!(!a.may_subscribe("newsx"));
        assert!(!acl(&[], None).may_subscribe("a"), "no claim, no topics");
    }

    #[test]
    fn a_publish_claim_narrows_or_stands_in_for_the_flag() {
        let none = acl(&[], None);
        assert!(!none.may_publish("chat.1", None));
        assert!(none.may_publish("chat.1", Some("chat.*")));
        let claim = acl(&[], Some(&["chat.1"]));
        assert!(claim.may_publish("chat.1", None), "in place of the flag");
        assert!(claim.may_publish("chat.1", Some("chat.*")));
        assert!(!claim.may_publish("chat.2", Some("chat.*")), "narrowing");
        assert!(!claim.may_publish("chat.1", Some("other.*")), "never wider");
    }

    #[test]
    fn origins_match_exactly_or_by_subdomain() {
        let o = Origins::parse(
            "https://app.example.com, *.example.org, https://*.example.net",
            false,
        )
        .unwrap();
        assert!(o.allows(Some("https://app.example.com")));
        assert!(o.allows(Some("HTTPS://APP.EXAMPLE.COM")));
        assert!(
            !o.allows(Some("http://app.example.com")),
            "the scheme counts"
        );
        assert!(!o.allows(Some("https://app.example.com.evil.com")));
        assert!(o.allows(Some("http://a.example.org")));
        assert!(o.allows(Some("https://a.b.example.org:8443")));
        assert!(
            !o.allows(Some("https://example.org")),
            "a subdomain, not the domain"
        );
        assert!(!o.allows(Some("https://badexample.org")));
        assert!(o.allows(Some("https://x.example.net")));
        assert!(!o.allows(Some("http://x.example.net")));
        assert!(!o.allows(Some("null")));
        assert!(!o.allows(None));
        assert!(Origins::parse("*.x.com", true).unwrap().allows(None));
        for bad in [
            "app.example.com",
            "https://",
            "*",
            "*example.com",
            "https://a/b",
            "",
        ] {
            assert!(Origins::parse(bad, false).is_err(), "{bad}");
        }
    }

    #[test]
    fn jwts_in_protocol_entries_are_recognised() {
        assert!(looks_like_jwt("eyJhbGciOi.eyJzdWIi.c2ln-_"));
        assert!(!looks_like_jwt("ringgate.v1"));
        assert!(!looks_like_jwt("a.b.c.d"));
        assert!(!looks_like_jwt("a.b=.c"));
    }
}
