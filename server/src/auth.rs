//! Access control: who is calling, and whether they may call this method.
//!
//! A caller proves who it is with an API key sent as gRPC metadata
//! `authorization: Bearer <key>`, or, on a mutual-TLS listener, with its
//! client certificate (whose subject then names it). Keys are stored only as
//! their SHA-256 (`handid-server keygen` prints a new key once, with the
//! settings entry holding its hash), so a leaked settings file gives no key.
//!
//! Each method needs one [`Scope`]; a key may further be limited to a list of
//! galleries, which the handlers check once the request is decoded
//! ([`Caller::check_gallery`]). Health and reflection stay open.
//!
//! No key: UNAUTHENTICATED. A key that is unknown: UNAUTHENTICATED. A known
//! key without the method's scope (or the gallery): PERMISSION_DENIED, naming
//! what is missing.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use rand_core::{OsRng, RngCore};
use sha2::{Digest, Sha256};
use tonic::Status;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::engine::Caller;
use crate::settings::{AuthSettings, Scope};

/// The metadata key carrying the API key (`Bearer <key>`).
pub const AUTHORIZATION: &str = "authorization";
/// The other metadata key the API documents for the key (the bare key).
pub const X_API_KEY: &str = "x-api-key";
/// Prefix of generated keys, so a leaked one is recognisable in a scan.
pub const KEY_PREFIX: &str = "hid_";

/// What a method requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone (health, reflection).
    Open,
    /// A caller holding this scope.
    Scoped(Scope),
    /// Any authenticated caller (methods this table does not know: the
    /// router answers UNIMPLEMENTED, but only to a known caller).
    Authenticated,
}

/// The access rule of a gRPC method path (`/handid.v1.HandId/Identify`).
pub fn access_of(path: &str) -> Access {
    if path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.") {
        return Access::Open;
    }
    if path.starts_with("/handid.v1.Admin/") {
        return Access::Scoped(Scope::Admin);
    }
    match path.strip_prefix("/handid.v1.HandId/") {
        Some("Identify" | "Verify" | "Embed" | "GetSubject" | "ListSubjects") => {
            Access::Scoped(Scope::Identify)
        }
        Some("Enroll" | "DeleteSubject" | "DeleteGallery") => Access::Scoped(Scope::Enroll),
        _ => Access::Authenticated,
    }
}

/// One holder of rights: a key or a certificate subject.
#[derive(Debug)]
struct Grant {
    id: String,
    scopes: HashSet<Scope>,
    galleries: Option<Arc<[String]>>,
}

impl Grant {
    fn new(id: &str, scopes: &[Scope], galleries: &[String]) -> Self {
        Self {
            id: id.to_owned(),
            scopes: scopes.iter().copied().collect(),
            galleries: (!galleries.is_empty()).then(|| galleries.to_vec().into()),
        }
    }
}

/// Decides who a call comes from and whether it may proceed.
#[derive(Debug)]
pub struct Authenticator {
    enabled: bool,
    /// Key grants by the hex SHA-256 of the key: the lookup never touches
    /// the key itself, so its timing says nothing about stored keys.
    keys: HashMap<String, Grant>,
    certificates: HashMap<String, Grant>,
}

impl Authenticator {
    /// Builds the tables of `settings` (validated beforehand).
    pub fn new(settings: &AuthSettings) -> Self {
        if settings.enabled && settings.keys.is_empty() && settings.certificates.is_empty() {
            tracing::warn!(
                "auth.enabled is true but no key or certificate is configured: every call will be refused"
            );
        }
        if !settings.enabled {
            tracing::warn!("auth.enabled is false: every caller may call everything (development only)");
        }
        Self {
            enabled: settings.enabled,
            keys: settings
                .keys
                .iter()
                .map(|k| {
                    (
                        k.sha256.to_ascii_lowercase(),
                        Grant::new(&k.id, &k.scopes, &k.galleries),
                    )
                })
                .collect(),
            certificates: settings
                .certificates
                .iter()
                .map(|c| (c.subject.clone(), Grant::new(&c.subject, &c.scopes, &c.galleries)))
                .collect(),
        }
    }

    /// Authenticates and authorises a call to `path` from its headers and
    /// connection; on success returns the [`Caller`] the handlers see.
    pub fn check(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        extensions: &http::Extensions,
    ) -> Result<Caller, Status> {
        let peer = peer_addr(extensions).map(|a| a.to_string());
        let subject = client_subject(extensions);
        let access = access_of(path);
        if !self.enabled || access == Access::Open {
            return Ok(Caller {
                id: subject.unwrap_or_else(|| "anonymous".to_owned()),
                peer,
                galleries: None,
            });
        }
        let grant = match presented_key(headers)? {
            Some(key) => self
                .keys
                .get(&hash_key(key))
                .ok_or_else(|| Status::unauthenticated("the API key is not valid"))?,
            None => match &subject {
                Some(subject) => self.certificates.get(subject).ok_or_else(|| {
                    Status::permission_denied(format!(
                        "client certificate {subject:?} has no grant in auth.certificates"
                    ))
                })?,
                None => {
                    return Err(Status::unauthenticated(
                        "an API key is required: send metadata \"authorization: Bearer <key>\"",
                    ));
                }
            },
        };
        if let Access::Scoped(scope) = access
            && !grant.scopes.contains(&scope)
        {
            return Err(Status::permission_denied(format!(
                "{:?} lacks the scope {:?} that {path} requires",
                grant.id,
                scope.as_str()
            )));
        }
        Ok(Caller {
            id: grant.id.clone(),
            peer,
            galleries: grant.galleries.clone(),
        })
    }
}

/// The API key of a call: `authorization: Bearer <key>` or `x-api-key:
/// <key>`. Both present with different keys is refused rather than one
/// of them chosen.
fn presented_key(headers: &http::HeaderMap) -> Result<Option<&str>, Status> {
    let bearer = match headers.get(AUTHORIZATION) {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .ok_or_else(|| {
                    Status::unauthenticated("the authorization metadata must be \"Bearer <API key>\"")
                })?,
        ),
    };
    let bare = match headers.get(X_API_KEY) {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .ok_or_else(|| Status::unauthenticated("the x-api-key metadata must hold the API key"))?,
        ),
    };
    match (bearer, bare) {
        (Some(a), Some(b)) if a != b => Err(Status::unauthenticated(
            "authorization and x-api-key carry different keys; send one",
        )),
        (a, b) => Ok(a.or(b)),
    }
}

/// The peer's address, over plain TCP or TLS.
pub fn peer_addr(extensions: &http::Extensions) -> Option<SocketAddr> {
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr())
        })
}

/// The subject (RFC 4514 text, e.g. `CN=door-1,O=Site`) of the verified
/// client certificate of a mutual-TLS connection.
pub fn client_subject(extensions: &http::Extensions) -> Option<String> {
    let certs = extensions
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(TlsConnectInfo::peer_certs)?;
    let leaf = certs.first()?;
    match x509_parser::parse_x509_certificate(leaf.as_ref()) {
        Ok((_, cert)) => Some(cert.subject().to_string()),
        Err(e) => {
            // rustls verified it, so this is unexpected; refuse to name it.
            tracing::warn!(error = %e, "client certificate subject unreadable");
            None
        }
    }
}

/// Lower-case hex SHA-256 of an API key, as settings store it.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A new random key: the prefix and 256 bits from the OS, in hex.
pub fn generate_key() -> String {
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    format!("{KEY_PREFIX}{}", hex::encode(bytes))
}

/// The settings entry (YAML, under `auth.keys`) for a key.
pub fn settings_snippet(id: &str, key: &str, scopes: &[Scope], galleries: &[String]) -> String {
    let names: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
    let mut out = format!(
        "auth:\n  keys:\n    - id: {id}\n      sha256: {}\n      scopes: [{}]\n",
        hash_key(key),
        names.join(", ")
    );
    if !galleries.is_empty() {
        out.push_str(&format!("      galleries: [{}]\n", galleries.join(", ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::{ApiKeySettings, Settings};

    fn authenticator() -> Authenticator {
        Authenticator::new(&AuthSettings {
            enabled: true,
            keys: vec![ApiKeySettings {
                id: "door".to_owned(),
                sha256: hash_key("secret"),
                scopes: vec![Scope::Identify],
                galleries: vec!["site-1".to_owned()],
            }],
            certificates: Vec::new(),
        })
    }

    fn headers(value: Option<&str>) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        if let Some(v) = value {
            h.insert(AUTHORIZATION, v.parse().expect("header"));
        }
        h
    }

    #[test]
    fn methods_map_to_scopes() {
        assert_eq!(
            access_of("/handid.v1.HandId/Verify"),
            Access::Scoped(Scope::Identify)
        );
        assert_eq!(
            access_of("/handid.v1.HandId/DeleteGallery"),
            Access::Scoped(Scope::Enroll)
        );
        assert_eq!(
            access_of("/handid.v1.Admin/ReloadModel"),
            Access::Scoped(Scope::Admin)
        );
        assert_eq!(access_of("/grpc.health.v1.Health/Check"), Access::Open);
        assert_eq!(access_of("/handid.v1.HandId/Nope"), Access::Authenticated);
    }

    #[test]
    fn keys_are_checked_by_hash_and_scope() {
        let auth = authenticator();
        let ext = http::Extensions::new();
        let path = "/handid.v1.HandId/Identify";
        let caller = auth
            .check(path, &headers(Some("Bearer secret")), &ext)
            .expect("valid key");
        assert_eq!(caller.id, "door");
        assert!(caller.galleries.is_some());
        for (value, code) in [
            (None, tonic::Code::Unauthenticated),
            (Some("Bearer wrong"), tonic::Code::Unauthenticated),
            (Some("secret"), tonic::Code::Unauthenticated),
        ] {
            let err = auth.check(path, &headers(value), &ext).expect_err("refused");
            assert_eq!(err.code(), code, "{value:?}");
        }
        let mut bare = http::HeaderMap::new();
        bare.insert(X_API_KEY, "secret".parse().expect("header"));
        assert_eq!(auth.check(path, &bare, &ext).expect("x-api-key").id, "door");
        bare.insert(AUTHORIZATION, "Bearer secret".parse().expect("header"));
        assert_eq!(
            auth.check(path, &bare, &ext).expect("the same key twice").id,
            "door"
        );
        bare.insert(X_API_KEY, "other".parse().expect("header"));
        let err = auth.check(path, &bare, &ext).expect_err("two different keys");
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(err.message().contains("different keys"), "{}", err.message());
        let err = auth
            .check("/handid.v1.HandId/Enroll", &headers(Some("Bearer secret")), &ext)
            .expect_err("no enroll scope");
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(err.message().contains("\"enroll\""), "{}", err.message());
    }

    #[test]
    fn generated_keys_are_unique_and_the_snippet_is_valid_settings() {
        let (a, b) = (generate_key(), generate_key());
        assert_ne!(a, b);
        assert_eq!(a.len(), KEY_PREFIX.len() + 64);
        let snippet = settings_snippet("door-1", &a, &[Scope::Identify, Scope::Enroll], &[]);
        let settings = Settings::from_yaml_and_env(&snippet, Vec::new()).expect("snippet parses");
        assert_eq!(settings.auth.keys[0].sha256, hash_key(&a));
        assert!(!snippet.contains(&a), "the key itself must not be in the snippet");
    }
}
