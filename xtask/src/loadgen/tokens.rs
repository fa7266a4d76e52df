//! Tokens the load generator mints for servers with `--auth-*`: one per
//! connection, `sub` `u<index>`, `topics` the connection's own topic, an hour
//! to live, signed with HS256 (`--token-secret`) or the private PEM key of
//! `--token-key` (ES256 for a P-256 key, RS256 for RSA, EdDSA for Ed25519).
//! The parent mints them all into a file before the clock starts (signing is
//! the client's cost, not the server's); workers read their lines.

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

/// The tokens file of a run with `--token-secret` or `--token-key`.
pub fn mint_for(args: &super::Args) -> Result<Option<std::path::PathBuf>, String> {
    match TokenSpec::from_args(args.token_secret.as_deref(), args.token_key.as_deref())? {
        Some(spec) => Ok(Some(spec.mint_file(args.conns, args.topics)?)),
        None => Ok(None),
    }
}

/// How to sign.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenSpec {
    /// HS256 secret, or a private key in PEM.
    pub secret: Option<String>,
    pub key_pem: Option<String>,
}

impl TokenSpec {
    /// From `--token-secret` / `--token-key`, if either is given.
    pub fn from_args(
        secret: Option<&str>,
        key: Option<&std::path::Path>,
    ) -> Result<Option<TokenSpec>, String> {
        let key_pem = match key {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| format!("--token-key {}: {e}", path.display()))?,
            ),
            None => None,
        };
        let spec = match (secret, key_pem) {
            (None, None) => return Ok(None),
            (secret, key_pem) => TokenSpec {
                secret: secret.map(str::to_string),
                key_pem,
            },
        };
        spec.signer()?;
        Ok(Some(spec))
    }

    fn signer(&self) -> Result<(Algorithm, EncodingKey), String> {
        if let Some(secret) = &self.secret {
            let key = EncodingKey::from_secret(secret.as_bytes()).map_err(|e| e.to_string())?;
            return Ok((Algorithm::HS256, key));
        }
        let pem = self.key_pem.as_deref().unwrap_or("").as_bytes();
        if let Ok(key) = EncodingKey::from_ec_pem(pem) {
            return Ok((Algorithm::ES256, key));
        }
        if let Ok(key) = EncodingKey::from_ed_pem(pem) {
            return Ok((Algorithm::EdDSA, key));
        }
        if let Ok(key) = EncodingKey::from_rsa_pem(pem) {
            return Ok((Algorithm::RS256, key));
        }
        Err("--token-key: not a private PEM key of P-256, Ed25519 or RSA".into())
    }

    /// Mints a token for each of `conns` connections (topic `t<index % topics>`)
    /// into a file; returns its path.
    pub fn mint_file(&self, conns: usize, topics: usize) -> Result<std::path::PathBuf, String> {
        let path = std::env::temp_dir().join(format!("loadgen-tokens-{}", std::process::id()));
        let mut text = String::with_capacity(conns * 320);
        for i in 0..conns {
            text.push_str(&self.mint(&format!("u{i}"), &format!("t{}", i % topics.max(1)))?);
            text.push('\n');
        }
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(path)
    }

    /// A token for `sub` allowed to subscribe to `topic`.
    pub fn mint(&self, sub: &str, topic: &str) -> Result<String, String> {
        let (alg, key) = self.signer()?;
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            + 3600;
        let claims = serde_json::json!({"sub": sub, "topics": [topic], "exp": exp});
        encode(&Header::new(alg), &claims, &key).map_err(|e| e.to_string())
    }
}
