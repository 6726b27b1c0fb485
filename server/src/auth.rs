//! Access control: who is calling, and whether they may call this method.
//!
//! A caller proves who it is with an API key sent as gRPC metadata
//! `authorization: Bearer <key>` (or `x-api-key`), or, on a mutual-TLS
//! listener, with its client certificate, granted by its parsed subject or
//! one subject alternative name ([`PeerCertificate`], [`parse_dn`]); the
//! grant names the caller. Keys are stored only as their SHA-256
//! (`handid-server keygen` prints a new key once, with the settings entry
//! holding its hash), so a leaked settings file gives no key.
//!
//! Each method needs one [`Scope`]; a key may further be limited to a list of
//! galleries, which the handlers check once the request is decoded
//! ([`Caller::check_gallery`], [`Caller::check_embed`]). Health and
//! reflection stay open.
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
use x509_parser::extensions::GeneralName;

use crate::audit::CallRecord;
use crate::engine::Caller;
use crate::settings::{AuthSettings, CertificateGrant, Scope};

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
        Some("Identify" | "Verify" | "GetSubject" | "ListSubjects") => Access::Scoped(Scope::Identify),
        Some("Embed") => Access::Scoped(Scope::Embed),
        Some("Enroll" | "DeleteSubject" | "DeleteGallery") => Access::Scoped(Scope::Enroll),
        _ => Access::Authenticated,
    }
}

/// One holder of rights: a key or a certificate grant.
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

/// How a certificate grant recognises its client.
#[derive(Debug, PartialEq, Eq)]
enum CertMatch {
    /// The subject's attributes, parsed ([`parse_dn`]), equal as a set.
    Subject(Vec<(String, String)>),
    /// One subject alternative name (`dns:`, `uri:` or `email:` and the
    /// name).
    San(String),
}

impl CertMatch {
    /// How `grant` recognises its client; its subject or san must parse.
    fn of(grant: &CertificateGrant) -> Result<Self, NameError> {
        match (&grant.subject, &grant.san) {
            (Some(subject), None) => parse_dn(subject).map(CertMatch::Subject),
            (None, Some(san)) => parse_san(san).map(CertMatch::San),
            _ => Err(NameError {
                text: grant.id(),
                problem: NameProblem::SubjectOrSan,
            }),
        }
    }
}

/// Longest grant subject or san accepted: the text is the caller's name in
/// the audit log and in every log line of its calls.
pub const MAX_GRANT_NAME: usize = 1024;

/// Which certificates a grant recognises, as settings validation compares
/// two grants: equal when they would match the same certificates (the same
/// subject attributes, or the same san), whatever their text.
#[derive(Debug, PartialEq, Eq)]
pub struct GrantMatch(CertMatch);

/// Checks a certificate grant's subject or san (settings validation) and
/// returns what it matches. Its text is the caller id the audit log records,
/// so it must also be a name that log can hold on one line: no control
/// characters (parse_dn would take them as part of a value) and at most
/// [`MAX_GRANT_NAME`] bytes.
pub fn check_grant(grant: &CertificateGrant) -> Result<GrantMatch, NameError> {
    let text = grant.id();
    let fail = |problem| NameError {
        text: text.clone(),
        problem,
    };
    if text.chars().any(char::is_control) {
        return Err(fail(NameProblem::ControlCharacter));
    }
    if text.len() > MAX_GRANT_NAME {
        return Err(fail(NameProblem::TooLong));
    }
    CertMatch::of(grant).map(GrantMatch)
}

/// Longest API key id accepted.
pub const MAX_KEY_ID: usize = 128;

/// Checks an API key id: 1 to [`MAX_KEY_ID`] characters of `A-Z a-z 0-9 .
/// _ : @ -`. Key ids are written into YAML by `handid-server keygen` and
/// name the caller in the audit log, the logs, rate limits and gallery
/// quotas, so they are kept plain wherever they come from: the keygen
/// command line or an entry edited by hand in the settings file.
pub fn check_key_id(id: &str) -> Result<(), String> {
    let plain = |b: u8| b.is_ascii_alphanumeric() || b"._:@-".contains(&b);
    if id.is_empty() || id.len() > MAX_KEY_ID || !id.bytes().all(plain) {
        return Err(format!(
            "{id:?}: use 1-{MAX_KEY_ID} characters of A-Z a-z 0-9 . _ : @ -"
        ));
    }
    Ok(())
}

/// Decides who a call comes from and whether it may proceed.
#[derive(Debug)]
pub struct Authenticator {
    enabled: bool,
    /// Key grants by the hex SHA-256 of the key: the lookup never touches
    /// the key itself, so its timing says nothing about stored keys.
    keys: HashMap<String, Grant>,
    /// Certificate grants, in settings order (the first that matches).
    certificates: Vec<(CertMatch, Grant)>,
}

impl Authenticator {
    /// Builds the tables of `settings` (validated beforehand: a grant whose
    /// subject does not parse is skipped, with an error in the log).
    pub fn new(settings: &AuthSettings) -> Self {
        if settings.enabled && settings.keys.is_empty() && settings.certificates.is_empty() {
            tracing::warn!(
                "auth.enabled is true but no key or certificate is configured: every call will be refused"
            );
        }
        if !settings.enabled {
            tracing::warn!("auth.enabled is false: every caller may call everything (development only)");
        }
        let certificates = settings
            .certificates
            .iter()
            .filter_map(|c| match CertMatch::of(c) {
                Ok(matcher) => Some((matcher, Grant::new(&c.id(), &c.scopes, &c.galleries))),
                Err(e) => {
                    tracing::error!(grant = %c.id(), error = %e, "certificate grant ignored");
                    None
                }
            })
            .collect();
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
            certificates,
        }
    }

    /// The grant of a client certificate, if one matches it.
    fn certificate_grant(&self, cert: &PeerCertificate) -> Option<&Grant> {
        self.certificates
            .iter()
            .find(|(matcher, _)| match matcher {
                CertMatch::Subject(attributes) => cert.subject.as_deref() == Some(attributes.as_slice()),
                CertMatch::San(name) => cert.sans.iter().any(|n| n == name),
            })
            .map(|(_, grant)| grant)
    }

    /// Authenticates and authorises a call to `path` from its headers and
    /// connection; on success returns the [`Caller`] the handlers see. The
    /// call's [`CallRecord`] (from the audit layer) learns who called, even
    /// when the call is then refused.
    pub fn check(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        extensions: &http::Extensions,
    ) -> Result<Caller, Status> {
        let peer = peer_addr(extensions).map(|a| a.to_string());
        let record = extensions.get::<Arc<CallRecord>>().cloned().unwrap_or_default();
        let cert = peer_certificate(extensions);
        let access = access_of(path);
        if !self.enabled || access == Access::Open {
            let id = match &cert {
                Some(cert) => cert.display(),
                None => "anonymous".to_owned(),
            };
            record.set_actor(&id);
            return Ok(Caller {
                id,
                peer,
                galleries: None,
                record,
            });
        }
        let grant = match presented_key(headers)? {
            Some(key) => self
                .keys
                .get(&hash_key(key))
                .ok_or_else(|| Status::unauthenticated("the API key is not valid"))?,
            None => match &cert {
                Some(cert) => self.certificate_grant(cert).ok_or_else(|| {
                    Status::permission_denied(format!(
                        "client certificate {:?} has no grant in auth.certificates",
                        cert.display()
                    ))
                })?,
                None => {
                    return Err(Status::unauthenticated(
                        "an API key is required: send metadata \"authorization: Bearer <key>\"",
                    ));
                }
            },
        };
        record.set_actor(&grant.id);
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
            record,
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

/// A verified client certificate, as access control compares it: its
/// subject's attributes (type OID, value; sorted: compared as a set) and its
/// subject alternative names. Nothing is compared as display text, so an
/// attribute value that looks like more attributes (`O=Example, CN=door-7`)
/// is one value and impersonates no one.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerCertificate {
    /// `None` when an attribute is not a string (such a subject matches no
    /// subject grant).
    subject: Option<Vec<(String, String)>>,
    /// In RFC 4514 order, for the log and an auth-off audit row.
    display: Vec<(String, String)>,
    sans: Vec<String>,
}

impl PeerCertificate {
    /// Reads a DER certificate.
    pub fn from_der(der: &[u8]) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .inspect_err(|e| tracing::warn!(error = %e, "client certificate unreadable"))
            .ok()?;
        let mut display = Vec::new();
        let mut all_strings = true;
        for attribute in cert.subject().iter_attributes() {
            let oid = attribute.attr_type().to_id_string();
            match attribute.as_str() {
                Ok(value) => display.push((oid, value.to_owned())),
                Err(_) => all_strings = false,
            }
        }
        // DER lists the most general first; RFC 4514 text the most specific.
        display.reverse();
        let mut subject = display.clone();
        subject.sort();
        let sans = match cert.subject_alternative_name() {
            Ok(Some(extension)) => extension
                .value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::DNSName(n) => Some(format!("dns:{}", n.to_ascii_lowercase())),
                    GeneralName::URI(u) => Some(format!("uri:{u}")),
                    GeneralName::RFC822Name(e) => Some(format!("email:{e}")),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        Some(Self {
            subject: all_strings.then_some(subject),
            display,
            sans,
        })
    }

    /// The subject as RFC 4514 text, values escaped (`CN=door-7,O=Site`).
    pub fn display(&self) -> String {
        self.display
            .iter()
            .map(|(oid, value)| format!("{}={}", short_name(oid), escape_value(value)))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The verified client certificate of a mutual-TLS connection.
pub fn peer_certificate(extensions: &http::Extensions) -> Option<PeerCertificate> {
    let certs = extensions
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(TlsConnectInfo::peer_certs)?;
    PeerCertificate::from_der(certs.first()?.as_ref())
}

/// Attribute names RFC 4514 and common use give, and their OIDs.
const ATTRIBUTES: [(&str, &str); 14] = [
    ("CN", "2.5.4.3"),
    ("SN", "2.5.4.4"),
    ("SERIALNUMBER", "2.5.4.5"),
    ("C", "2.5.4.6"),
    ("L", "2.5.4.7"),
    ("ST", "2.5.4.8"),
    ("STREET", "2.5.4.9"),
    ("O", "2.5.4.10"),
    ("OU", "2.5.4.11"),
    ("TITLE", "2.5.4.12"),
    ("GIVENNAME", "2.5.4.42"),
    ("UID", "0.9.2342.19200300.100.1.1"),
    ("DC", "0.9.2342.19200300.100.1.25"),
    ("EMAILADDRESS", "1.2.840.113549.1.9.1"),
];

fn short_name(oid: &str) -> &str {
    ATTRIBUTES
        .iter()
        .find(|(_, o)| *o == oid)
        .map_or(oid, |(name, _)| name)
}

/// RFC 4514 §2.4: the characters a value escapes; control characters too
/// (as `\XX`), so a certificate cannot write lines into the log.
fn escape_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        if c.is_control() {
            let mut bytes = [0; 4];
            for byte in c.encode_utf8(&mut bytes).bytes() {
                out.push_str(&format!("\\{byte:02X}"));
            }
            continue;
        }
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && matches!(c, '#' | ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A certificate grant's subject or subject alternative name that cannot
/// be read; settings validation reports it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?}: {problem}")]
pub struct NameError {
    /// The text as written in the settings.
    pub text: String,
    /// What is wrong with it.
    pub problem: NameProblem,
}

/// What is wrong with a grant's name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameProblem {
    /// Nothing before an `=` (also an empty text, or a trailing `,`).
    #[error("an attribute without a type")]
    NoType,
    /// A type without `=value`.
    #[error("attribute {0:?} has no '=value'")]
    NoValue(String),
    /// A type that is neither a known name nor a dotted OID.
    #[error("unknown attribute type {0:?} (CN, O, OU, C, L, ST, DC, UID, ... or a dotted OID)")]
    UnknownType(String),
    /// `CN=` with nothing after it.
    #[error("attribute {0} has an empty value")]
    EmptyValue(String),
    /// A `\` ending the text.
    #[error("a trailing '\\'")]
    TrailingBackslash,
    /// A `\` before something that is neither special nor two hex digits.
    #[error("'\\{0}' is not an escape (a '\\' precedes one of \",+;<>\\ #= or two hex digits)")]
    BadEscape(String),
    /// `\XX` escapes whose bytes are not UTF-8.
    #[error("escaped bytes that are not UTF-8")]
    NotUtf8,
    /// A `#`-prefixed (BER-encoded) value.
    #[error("'#' (BER-encoded) values are not supported")]
    Ber,
    /// A grant with both a subject and a san, or neither.
    #[error("a certificate grant names a subject or a san, exactly one")]
    SubjectOrSan,
    /// A subject alternative name of no known kind, or empty.
    #[error("a san is dns:NAME, uri:URI or email:ADDRESS")]
    BadSan,
    /// A control character (a line break, a tab) in the text, which names
    /// the caller in the audit log: escape it in a subject (`\0A`).
    #[error("a control character in the text, which names the caller in the audit log (escape it as \\XX)")]
    ControlCharacter,
    /// A text longer than [`MAX_GRANT_NAME`] bytes.
    #[error(
        "longer than {} bytes, too long for the caller's name in the audit log",
        MAX_GRANT_NAME
    )]
    TooLong,
}

/// Parses RFC 4514 text (`CN=desk,O=Example`; spaces around separators
/// allowed; multi-valued RDNs with `+`; `\,` and `\2C` escapes) into
/// attributes (type OID, value), sorted: a grant and a certificate match
/// when they hold the same attributes with the same values (exactly, case
/// included), whatever their order or grouping. Types are the usual names
/// (CN, O, OU, C, L, ST, STREET, DC, UID, SN, SERIALNUMBER, TITLE,
/// GIVENNAME, EMAILADDRESS or E; any case) or dotted OIDs; `#`-encoded
/// values are not supported.
pub fn parse_dn(text: &str) -> Result<Vec<(String, String)>, NameError> {
    let fail = |problem| NameError {
        text: text.to_owned(),
        problem,
    };
    let mut attributes = Vec::new();
    let mut chars = text.chars();
    loop {
        // The type, up to '=' (a separator first: a type without a value).
        let mut name = String::new();
        let mut has_value = false;
        for c in chars.by_ref() {
            match c {
                '=' => {
                    has_value = true;
                    break;
                }
                ',' | '+' => break,
                c => name.push(c),
            }
        }
        let name = name.trim();
        if name.is_empty() {
            return Err(fail(NameProblem::NoType));
        }
        if !has_value {
            return Err(fail(NameProblem::NoValue(name.to_owned())));
        }
        let oid = attribute_oid(name).ok_or_else(|| fail(NameProblem::UnknownType(name.to_owned())))?;
        let (value, more) = parse_value(&mut chars).map_err(fail)?;
        if value.is_empty() {
            return Err(fail(NameProblem::EmptyValue(name.to_owned())));
        }
        attributes.push((oid, value));
        if !more {
            break;
        }
    }
    attributes.sort();
    Ok(attributes)
}

/// The OID of an attribute type: a name of [`ATTRIBUTES`] (or `E`, an old
/// spelling of emailAddress) in any case, or a dotted OID as it is.
fn attribute_oid(name: &str) -> Option<String> {
    let dotted = name.split('.').count() >= 2
        && name
            .split('.')
            .all(|arc| !arc.is_empty() && arc.chars().all(|c| c.is_ascii_digit()));
    if dotted {
        return Some(name.to_owned());
    }
    let name = if name.eq_ignore_ascii_case("E") {
        "EMAILADDRESS"
    } else {
        name
    };
    ATTRIBUTES
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, oid)| (*oid).to_owned())
}

/// One attribute value, unescaped, up to an unescaped `,` or `+` (then
/// `true`: another attribute follows) or the end. Unescaped spaces around
/// it are not part of it.
fn parse_value(chars: &mut std::str::Chars<'_>) -> Result<(String, bool), NameProblem> {
    let mut value = String::new();
    // Bytes of consecutive `\XX` escapes: one UTF-8 character may take
    // several.
    let mut raw: Vec<u8> = Vec::new();
    // The length of `value` up to its last character that is not an
    // unescaped space.
    let mut end = 0;
    let mut more = false;
    while let Some(c) = chars.next() {
        match c {
            ',' | '+' => {
                more = true;
                break;
            }
            '\\' => {
                let next = chars.next().ok_or(NameProblem::TrailingBackslash)?;
                if next.is_ascii_hexdigit() {
                    let low = chars
                        .next()
                        .filter(char::is_ascii_hexdigit)
                        .ok_or_else(|| NameProblem::BadEscape(next.to_string()))?;
                    let pair = [next as u8, low as u8];
                    let byte = std::str::from_utf8(&pair)
                        .ok()
                        .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                        .ok_or_else(|| NameProblem::BadEscape(next.to_string()))?;
                    raw.push(byte);
                } else if matches!(next, '"' | '+' | ',' | ';' | '<' | '>' | '\\' | ' ' | '#' | '=') {
                    flush(&mut raw, &mut value, &mut end)?;
                    value.push(next);
                    end = value.len();
                } else {
                    return Err(NameProblem::BadEscape(next.to_string()));
                }
            }
            ' ' if value.is_empty() && raw.is_empty() => {}
            '#' if value.is_empty() && raw.is_empty() => return Err(NameProblem::Ber),
            c => {
                flush(&mut raw, &mut value, &mut end)?;
                value.push(c);
                if c != ' ' {
                    end = value.len();
                }
            }
        }
    }
    flush(&mut raw, &mut value, &mut end)?;
    value.truncate(end);
    Ok((value, more))
}

/// Appends the bytes gathered from `\XX` escapes to `value`.
fn flush(raw: &mut Vec<u8>, value: &mut String, end: &mut usize) -> Result<(), NameProblem> {
    if !raw.is_empty() {
        value.push_str(std::str::from_utf8(raw).map_err(|_| NameProblem::NotUtf8)?);
        raw.clear();
        *end = value.len();
    }
    Ok(())
}

/// Reads a subject alternative name grant: `dns:NAME` (compared without
/// regard to case, as DNS does), `uri:URI` or `email:ADDRESS` (compared
/// exactly). Returns it in the form [`PeerCertificate`] lists a
/// certificate's names.
pub fn parse_san(text: &str) -> Result<String, NameError> {
    let fail = || NameError {
        text: text.to_owned(),
        problem: NameProblem::BadSan,
    };
    let (kind, name) = text.split_once(':').ok_or_else(fail)?;
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(fail());
    }
    match kind.to_ascii_lowercase().as_str() {
        "dns" => Ok(format!("dns:{}", name.to_ascii_lowercase())),
        kind @ ("uri" | "email") => Ok(format!("{kind}:{name}")),
        _ => Err(fail()),
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
        assert_eq!(
            access_of("/handid.v1.Admin/CancelMigration"),
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

    /// A client certificate (DER) with `subject` (type, value; in the
    /// order DER lists them) and DNS / URI subject alternative names.
    fn certificate(subject: &[(rcgen::DnType, &str)], dns: &[&str], uris: &[&str]) -> Vec<u8> {
        use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
        let mut params =
            CertificateParams::new(dns.iter().map(|d| (*d).to_owned()).collect::<Vec<_>>()).expect("params");
        let mut name = DistinguishedName::new();
        for (kind, value) in subject {
            name.push(kind.clone(), *value);
        }
        params.distinguished_name = name;
        for uri in uris {
            params
                .subject_alt_names
                .push(SanType::URI((*uri).try_into().expect("ia5")));
        }
        let key = KeyPair::generate().expect("key");
        params.self_signed(&key).expect("certificate").der().to_vec()
    }

    fn grant(subject: Option<&str>, san: Option<&str>) -> CertificateGrant {
        CertificateGrant {
            subject: subject.map(str::to_owned),
            san: san.map(str::to_owned),
            scopes: vec![Scope::Identify],
            galleries: Vec::new(),
        }
    }

    fn problem(text: &str) -> NameProblem {
        parse_dn(text).expect_err(text).problem
    }

    #[test]
    fn subjects_parse_to_attribute_sets_whatever_their_order_or_spacing() {
        let want = vec![
            ("2.5.4.10".to_owned(), "Example".to_owned()),
            ("2.5.4.3".to_owned(), "desk".to_owned()),
        ];
        for text in [
            "CN=desk,O=Example",
            "O=Example, CN=desk",
            "o=Example+cn=desk",
            " CN = desk ,  O=Example ",
            "2.5.4.3=desk,2.5.4.10=Example",
            r"CN=\64esk,O=Example",
        ] {
            assert_eq!(parse_dn(text).expect(text), want, "{text}");
        }
        // Another attribute, or a different value, is another subject.
        assert_ne!(parse_dn("CN=desk,O=Example,OU=x").expect("ou"), want);
        assert_ne!(parse_dn("CN=Desk,O=Example").expect("case"), want);
        assert_eq!(
            parse_dn("E=desk@example.org").expect("E"),
            parse_dn("emailAddress=desk@example.org").expect("emailAddress")
        );
    }

    #[test]
    fn escapes_keep_separators_inside_one_value() {
        let one = |text: &str| {
            let mut attributes = parse_dn(text).expect(text);
            assert_eq!(attributes.len(), 1, "{text}: {attributes:?}");
            attributes.remove(0).1
        };
        assert_eq!(one(r"O=Evil\, CN=desk"), "Evil, CN=desk");
        assert_eq!(one(r"O=Evil\2C CN=desk"), "Evil, CN=desk");
        assert_eq!(one(r"O=Evil\2c CN\3ddesk"), "Evil, CN=desk");
        assert_eq!(one(r"CN=a\+b"), "a+b");
        assert_eq!(one(r"CN=\#1"), "#1");
        assert_eq!(one(r#"CN=\"q\"\;\<\>\\"#), r#""q";<>\"#);
        // Multi-byte UTF-8 from hex pairs, and as it is.
        assert_eq!(one(r"CN=Ren\C3\A9"), "Ren\u{e9}");
        assert_eq!(one("CN=Ren\u{e9}"), "Ren\u{e9}");
        // Unescaped spaces around a value are not part of it; escaped ones are.
        assert_eq!(one("CN=  desk  "), "desk");
        assert_eq!(one(r"CN=desk\ "), "desk ");
        assert_eq!(one(r"CN=\ desk"), " desk");
        assert_eq!(one(r"CN=desk\20"), "desk ");
        assert_eq!(one("CN=front desk"), "front desk");
        assert_ne!(
            parse_dn(r"O=Evil\, CN=desk").expect("escaped"),
            parse_dn("O=Evil, CN=desk").expect("two attributes")
        );
    }

    #[test]
    fn malformed_subjects_are_refused_with_the_reason() {
        for (text, want) in [
            ("", NameProblem::NoType),
            ("CN=desk,", NameProblem::NoType),
            ("CN=desk,,O=x", NameProblem::NoType),
            ("=desk", NameProblem::NoType),
            ("CN", NameProblem::NoValue("CN".to_owned())),
            ("CN=desk,O", NameProblem::NoValue("O".to_owned())),
            ("XX=desk", NameProblem::UnknownType("XX".to_owned())),
            ("1.=desk", NameProblem::UnknownType("1.".to_owned())),
            ("CN=", NameProblem::EmptyValue("CN".to_owned())),
            ("CN=  ", NameProblem::EmptyValue("CN".to_owned())),
            ("CN=desk\\", NameProblem::TrailingBackslash),
            (r"CN=de\sk", NameProblem::BadEscape("s".to_owned())),
            (r"CN=\4", NameProblem::BadEscape("4".to_owned())),
            (r"CN=\4g", NameProblem::BadEscape("4".to_owned())),
            (r"CN=\C3", NameProblem::NotUtf8),
            (r"CN=\FF\FE", NameProblem::NotUtf8),
            ("CN=#0403616263", NameProblem::Ber),
        ] {
            assert_eq!(problem(text), want, "{text:?}");
        }
        let message = parse_dn("XX=desk").expect_err("unknown").to_string();
        assert!(
            message.starts_with("\"XX=desk\": unknown attribute type"),
            "{message}"
        );
    }

    #[test]
    fn sans_name_their_kind_and_dns_names_ignore_case() {
        assert_eq!(
            parse_san("dns:Door-7.Example").expect("dns"),
            "dns:door-7.example"
        );
        assert_eq!(
            parse_san("DNS:door-7.example").expect("DNS"),
            "dns:door-7.example"
        );
        assert_eq!(
            parse_san("uri:spiffe://site/Door-9").expect("uri"),
            "uri:spiffe://site/Door-9"
        );
        assert_eq!(
            parse_san("email:desk@example.org").expect("email"),
            "email:desk@example.org"
        );
        for text in ["door-7", "dns:", "ip:10.0.0.1", "dns:a b", "uri:x\ny", ":x"] {
            let e = parse_san(text).expect_err(text);
            assert_eq!(e.problem, NameProblem::BadSan, "{text:?}");
        }
    }

    #[test]
    fn certificates_match_grants_by_parsed_subject_or_san_never_by_text() {
        use rcgen::DnType;
        let auth = Authenticator::new(&AuthSettings {
            enabled: true,
            keys: Vec::new(),
            certificates: vec![
                grant(Some("CN=desk,O=Example"), None),
                grant(None, Some("dns:door-7.example")),
                grant(None, Some("uri:spiffe://site/door-9")),
            ],
        });
        let granted = |der: &[u8]| {
            let cert = PeerCertificate::from_der(der).expect("readable");
            auth.certificate_grant(&cert).map(|g| g.id.clone())
        };
        let cn = |v| (DnType::CommonName, v);
        let o = |v| (DnType::OrganizationName, v);
        // The documented grant, whatever the order in the certificate.
        assert_eq!(
            granted(&certificate(&[o("Example"), cn("desk")], &[], &[])).as_deref(),
            Some("CN=desk,O=Example")
        );
        assert_eq!(
            granted(&certificate(&[cn("desk"), o("Example")], &[], &[])).as_deref(),
            Some("CN=desk,O=Example")
        );
        // Values that display like the grant, and subjects with more or
        // fewer attributes, match nothing.
        for subject in [
            vec![o("Evil, CN=desk")],
            vec![o("Example, CN=desk")],
            vec![cn("desk,O=Example")],
            vec![cn("desk, O=Example")],
            vec![o("Evil"), cn("desk,O=Example")],
            vec![o("Example"), cn("desk"), (DnType::OrganizationalUnitName, "x")],
            vec![cn("desk")],
            vec![o("example"), cn("desk")],
        ] {
            let der = certificate(&subject, &[], &[]);
            assert_eq!(granted(&der), None, "{subject:?}");
        }
        let injected =
            PeerCertificate::from_der(&certificate(&[o("Evil, CN=desk")], &[], &[])).expect("cert");
        assert_eq!(injected.display(), r"O=Evil\, CN=desk");
        let odd = certificate(&[cn("#a\nb "), o("x+y")], &[], &[]);
        let odd = PeerCertificate::from_der(&odd).expect("cert");
        assert_eq!(odd.display(), r"O=x\+y,CN=\#a\0Ab\ ");
        // The display, parsed, is the subject again.
        assert_eq!(parse_dn(&odd.display()).ok(), odd.subject);
        // Subject alternative names: DNS without regard to case, URIs
        // exactly; a longer name is another name.
        assert_eq!(
            granted(&certificate(&[cn("x")], &["Door-7.example"], &[])).as_deref(),
            Some("dns:door-7.example")
        );
        assert_eq!(
            granted(&certificate(&[cn("x")], &[], &["spiffe://site/door-9"])).as_deref(),
            Some("uri:spiffe://site/door-9")
        );
        for (dns, uris) in [
            (vec!["door-7.example.evil"], vec![]),
            (vec!["evil.door-7.example"], vec![]),
            (vec![], vec!["spiffe://site/door-9/x"]),
            (vec![], vec!["spiffe://site/Door-9"]),
        ] {
            let der = certificate(&[cn("door-7.example")], &dns, &uris);
            assert_eq!(granted(&der), None, "{dns:?} {uris:?}");
        }
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
