//! Access control against a real server: every key kind against every RPC
//! (the expected status asserted for each cell), a key made by the `keygen`
//! command, the audit log's "who", and TLS / mutual TLS with certificates
//! generated here.

mod common;

use std::time::Duration;

use common::{TestServer, checkpoint, settings, wait_for_health};
use handid_proto::v1 as pb;
use handid_proto::v1::admin_client::AdminClient;
use handid_proto::v1::hand_id_client::HandIdClient;
use handid_server::Settings;
use handid_server::audit::code_name;
use handid_server::auth::{generate_key, hash_key};
use handid_server::settings::{ApiKeySettings, CertificateGrant, Scope};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::{Code, Request};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// The RPCs of the matrix.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Rpc {
    Enroll,
    Identify,
    Verify,
    Embed,
    GetSubject,
    ListSubjects,
    DeleteSubject,
    DeleteGallery,
    GetModel,
    ReloadModel,
    PromoteModel,
    CancelMigration,
    Health,
}

const RPCS: [Rpc; 13] = [
    Rpc::Enroll,
    Rpc::Identify,
    Rpc::Verify,
    Rpc::Embed,
    Rpc::GetSubject,
    Rpc::ListSubjects,
    Rpc::DeleteSubject,
    Rpc::DeleteGallery,
    Rpc::GetModel,
    Rpc::ReloadModel,
    Rpc::PromoteModel,
    Rpc::CancelMigration,
    Rpc::Health,
];

impl Rpc {
    /// The scope it needs; None: open.
    fn scope(self) -> Option<Scope> {
        match self {
            Rpc::Enroll | Rpc::DeleteSubject | Rpc::DeleteGallery => Some(Scope::Enroll),
            Rpc::Identify | Rpc::Verify | Rpc::GetSubject | Rpc::ListSubjects => Some(Scope::Identify),
            Rpc::Embed => Some(Scope::Embed),
            Rpc::GetModel | Rpc::ReloadModel | Rpc::PromoteModel | Rpc::CancelMigration => Some(Scope::Admin),
            Rpc::Health => None,
        }
    }

    /// Whether it names a gallery.
    fn has_gallery(self) -> bool {
        !matches!(
            self,
            Rpc::Embed
                | Rpc::GetModel
                | Rpc::ReloadModel
                | Rpc::PromoteModel
                | Rpc::CancelMigration
                | Rpc::Health
        )
    }

    /// Its action in the audit log (None: not audited).
    fn action(self) -> Option<&'static str> {
        Some(match self {
            Rpc::Enroll => "enroll",
            Rpc::Identify => "identify",
            Rpc::Verify => "verify",
            Rpc::Embed => "embed",
            Rpc::GetSubject => "get_subject",
            Rpc::ListSubjects => "list_subjects",
            Rpc::DeleteSubject => "delete_subject",
            Rpc::DeleteGallery => "delete_gallery",
            Rpc::GetModel => "get_model",
            Rpc::ReloadModel => "reload",
            Rpc::PromoteModel => "promote",
            Rpc::CancelMigration => "cancel_migration",
            Rpc::Health => return None,
        })
    }

    /// Its status once admitted: the deletes aim at things that do not
    /// exist, so the fixture survives and NOT_FOUND proves the call got in;
    /// ReloadModel reloads the serving folder, and PromoteModel and
    /// CancelMigration find nothing staged (FAILED_PRECONDITION).
    fn admitted(self) -> Code {
        match self {
            Rpc::DeleteSubject | Rpc::DeleteGallery => Code::NotFound,
            Rpc::PromoteModel | Rpc::CancelMigration => Code::FailedPrecondition,
            _ => Code::Ok,
        }
    }
}

/// Sends `msg` with `key` (when given) as `authorization: Bearer <key>`.
fn with_key<T>(msg: T, key: Option<&str>) -> Request<T> {
    let mut request = Request::new(msg);
    if let Some(key) = key {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {key}").parse().expect("ascii key"),
        );
    }
    request
}

fn code<T>(result: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    match result {
        Ok(_) => (Code::Ok, String::new()),
        Err(status) => (status.code(), status.message().to_owned()),
    }
}

/// The fixture's gallery, its enrolled subject, and a gallery name that
/// exists nowhere (DeleteGallery's target).
const HOME: &str = "g";
const SUBJECT: &str = "s";
const GONE: &str = "gone";

/// Calls `rpc` on `gallery` with `key`; returns the status code and message.
async fn call(channel: &Channel, rpc: Rpc, key: Option<&str>, gallery: &str, n: usize) -> (Code, String) {
    let mut client = HandIdClient::new(channel.clone());
    let photo = common::people(1, 1).remove(0).1.remove(0);
    let image = || Some(pb::Image { data: photo.clone() });
    let g = gallery.to_owned();
    match rpc {
        Rpc::Enroll => code(
            client
                .enroll(with_key(
                    pb::EnrollRequest {
                        gallery_id: g,
                        subject_id: format!("new-{n}"),
                        images: vec![pb::Image { data: photo.clone() }],
                        idempotency_key: String::new(),
                    },
                    key,
                ))
                .await,
        ),
        Rpc::Identify => code(
            client
                .identify(with_key(
                    pb::IdentifyRequest {
                        gallery_id: g,
                        image: image(),
                        top_k: 1,
                        rule: None,
                    },
                    key,
                ))
                .await,
        ),
        Rpc::Verify => code(
            client
                .verify(with_key(
                    pb::VerifyRequest {
                        gallery_id: g,
                        subject_id: SUBJECT.to_owned(),
                        image: image(),
                        rule: None,
                    },
                    key,
                ))
                .await,
        ),
        Rpc::Embed => code(
            client
                .embed(with_key(
                    pb::EmbedRequest {
                        images: vec![pb::Image { data: photo.clone() }],
                    },
                    key,
                ))
                .await,
        ),
        Rpc::GetSubject => code(
            client
                .get_subject(with_key(
                    pb::GetSubjectRequest {
                        gallery_id: g,
                        subject_id: SUBJECT.to_owned(),
                    },
                    key,
                ))
                .await,
        ),
        Rpc::ListSubjects => code(
            client
                .list_subjects(with_key(
                    pb::ListSubjectsRequest {
                        gallery_id: g,
                        page_size: 0,
                        page_token: String::new(),
                    },
                    key,
                ))
                .await,
        ),
        Rpc::DeleteSubject => code(
            client
                .delete_subject(with_key(
                    pb::DeleteSubjectRequest {
                        gallery_id: g,
                        subject_id: "absent".to_owned(),
                    },
                    key,
                ))
                .await,
        ),
        Rpc::DeleteGallery => code(
            client
                .delete_gallery(with_key(
                    pb::DeleteGalleryRequest {
                        gallery_id: if gallery == HOME { GONE.to_owned() } else { g },
                    },
                    key,
                ))
                .await,
        ),
        Rpc::GetModel => code(
            AdminClient::new(channel.clone())
                .get_model(with_key(pb::GetModelRequest {}, key))
                .await,
        ),
        Rpc::ReloadModel => code(
            AdminClient::new(channel.clone())
                .reload_model(with_key(pb::ReloadModelRequest::default(), key))
                .await,
        ),
        Rpc::PromoteModel => code(
            AdminClient::new(channel.clone())
                .promote_model(with_key(
                    pb::PromoteModelRequest {
                        require_full_coverage: false,
                    },
                    key,
                ))
                .await,
        ),
        Rpc::CancelMigration => code(
            AdminClient::new(channel.clone())
                .cancel_migration(with_key(pb::CancelMigrationRequest {}, key))
                .await,
        ),
        Rpc::Health => code(
            HealthClient::new(channel.clone())
                .check(with_key(
                    HealthCheckRequest {
                        service: String::new(),
                    },
                    key,
                ))
                .await,
        ),
    }
}

/// One row of the matrix: a caller and what it holds.
struct Holder {
    name: &'static str,
    /// Its key id, as the audit log names it.
    id: &'static str,
    key: Option<String>,
    /// None: not a valid key at all.
    scopes: Option<Vec<Scope>>,
    galleries: Vec<String>,
}

fn key(id: &str, key: &str, scopes: &[Scope], galleries: &[&str]) -> ApiKeySettings {
    ApiKeySettings {
        id: id.to_owned(),
        sha256: hash_key(key),
        scopes: scopes.to_vec(),
        galleries: galleries.iter().map(|g| (*g).to_owned()).collect(),
    }
}

/// `handid-server keygen`: the printed key and the settings it printed.
fn keygen(id: &str, scopes: &str) -> (String, Settings) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_handid-server"))
        .args(["keygen", "--id", id, "--scopes", scopes])
        .output()
        .expect("run keygen");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let key = text
        .split_whitespace()
        .find(|w| w.starts_with(handid_server::auth::KEY_PREFIX))
        .expect("a key in the output")
        .to_owned();
    let yaml = &text[text.find("auth:").expect("a settings snippet")..];
    let yaml: String = yaml
        .lines()
        .take_while(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    let settings = Settings::from_yaml_and_env(&yaml, Vec::new()).expect("the snippet is valid settings");
    (key, settings)
}

#[test]
fn keygen_prints_no_entry_the_settings_would_refuse() {
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_handid-server"))
            .arg("keygen")
            .args(args)
            .output()
            .expect("run keygen")
    };
    let out = run(&[
        "--id",
        "ops",
        "--scopes",
        "admin,identify",
        "--galleries",
        "site-1",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("acts on every gallery"), "{stderr}");
    assert!(out.stdout.is_empty(), "printed a key or an entry");
    // The id rule is the settings' own.
    let out = run(&["--id", "door one", "--scopes", "identify"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("A-Z a-z 0-9 . _ : @ -"));
    let out = run(&["--id", "door-1", "--scopes", "identify", "--galleries", "site-1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[sqlx::test(migrations = false)]
async fn every_key_kind_gets_the_right_status_on_every_rpc(
    pool_options: PgPoolOptions,
    options: PgConnectOptions,
) {
    let dir = checkpoint();
    let (full_key, generated) = keygen("operator", "identify,embed,enroll");
    assert_eq!(
        generated.auth.keys[0].scopes,
        [Scope::Identify, Scope::Embed, Scope::Enroll]
    );
    let (reader, writer, admin, limited, embedder) = (
        generate_key(),
        generate_key(),
        generate_key(),
        generate_key(),
        generate_key(),
    );
    let mut s = settings(&options, dir.path());
    s.auth.enabled = true;
    s.auth.keys = generated.auth.keys.clone();
    s.auth.keys.extend([
        key("reader", &reader, &[Scope::Identify], &[]),
        key("writer", &writer, &[Scope::Enroll], &[]),
        key("ops", &admin, &[Scope::Admin], &[]),
        key("embedder", &embedder, &[Scope::Embed], &[]),
        key(
            "site-g",
            &limited,
            &[Scope::Identify, Scope::Embed, Scope::Enroll],
            &[HOME, GONE],
        ),
    ]);
    let server = TestServer::start(s).await;
    server.client().await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .expect("url")
        .connect()
        .await
        .expect("connect");

    // The fixture, enrolled with the keygen key.
    let photo = common::people(1, 1).remove(0).1.remove(0);
    HandIdClient::new(channel.clone())
        .enroll(with_key(
            pb::EnrollRequest {
                gallery_id: HOME.to_owned(),
                subject_id: SUBJECT.to_owned(),
                images: vec![pb::Image { data: photo }],
                idempotency_key: String::new(),
            },
            Some(&full_key),
        ))
        .await
        .expect("the keygen key enrols");

    let holders = [
        Holder {
            name: "no key",
            id: "unauthenticated",
            key: None,
            scopes: None,
            galleries: Vec::new(),
        },
        Holder {
            name: "wrong key",
            id: "unauthenticated",
            key: Some(generate_key()),
            scopes: None,
            galleries: Vec::new(),
        },
        Holder {
            name: "identify",
            id: "reader",
            key: Some(reader.clone()),
            scopes: Some(vec![Scope::Identify]),
            galleries: Vec::new(),
        },
        Holder {
            name: "enroll",
            id: "writer",
            key: Some(writer),
            scopes: Some(vec![Scope::Enroll]),
            galleries: Vec::new(),
        },
        Holder {
            name: "admin",
            id: "ops",
            key: Some(admin),
            scopes: Some(vec![Scope::Admin]),
            galleries: Vec::new(),
        },
        Holder {
            name: "embed",
            id: "embedder",
            key: Some(embedder),
            scopes: Some(vec![Scope::Embed]),
            galleries: Vec::new(),
        },
        Holder {
            name: "keygen identify+embed+enroll",
            id: "operator",
            key: Some(full_key),
            scopes: Some(vec![Scope::Identify, Scope::Embed, Scope::Enroll]),
            galleries: Vec::new(),
        },
        // Holds the embed scope, but Embed belongs to no gallery: refused.
        Holder {
            name: "gallery-limited",
            id: "site-g",
            key: Some(limited),
            scopes: Some(vec![Scope::Identify, Scope::Embed, Scope::Enroll]),
            galleries: vec![HOME.to_owned(), GONE.to_owned()],
        },
    ];
    let mut cells = 0;
    let mut n = 0;
    // (actor, action, outcome) of each call, as the audit log must say.
    let mut audited = Vec::new();
    for holder in &holders {
        // The limited key is also tried on a gallery outside its list.
        let targets: &[&str] = if holder.galleries.is_empty() {
            &[HOME]
        } else {
            &[HOME, "other"]
        };
        for &target in targets {
            for rpc in RPCS {
                n += 1;
                let (got, message) = call(&channel, rpc, holder.key.as_deref(), target, n).await;
                let want = match (rpc.scope(), &holder.scopes) {
                    (None, _) => Code::Ok,
                    (Some(_), None) => Code::Unauthenticated,
                    (Some(scope), Some(held)) if !held.contains(&scope) => Code::PermissionDenied,
                    (Some(_), Some(_)) if rpc == Rpc::Embed && !holder.galleries.is_empty() => {
                        Code::PermissionDenied
                    }
                    (Some(_), Some(_))
                        if rpc.has_gallery()
                            && !holder.galleries.is_empty()
                            && !holder.galleries.iter().any(|g| g == target) =>
                    {
                        Code::PermissionDenied
                    }
                    (Some(_), Some(_)) => rpc.admitted(),
                };
                assert_eq!(
                    got, want,
                    "{} calling {rpc:?} on {target}: {message}",
                    holder.name
                );
                if want == Code::PermissionDenied {
                    let scope = rpc.scope().expect("scoped");
                    let named = if holder.scopes.as_ref().is_some_and(|h| h.contains(&scope)) {
                        if rpc == Rpc::Embed {
                            "limited to galleries".to_owned()
                        } else {
                            format!("{target:?}")
                        }
                    } else {
                        format!("{:?}", scope.as_str())
                    };
                    assert!(message.contains(&named), "{}: {rpc:?}: {message}", holder.name);
                }
                if let Some(action) = rpc.action() {
                    let outcome = match got {
                        Code::Ok => "ok".to_owned(),
                        code => code_name(code),
                    };
                    audited.push((holder.id.to_owned(), action.to_owned(), outcome));
                }
                cells += 1;
            }
        }
    }
    assert_eq!(cells, RPCS.len() * (holders.len() + 1));

    // Every call but the health checks left one row, refused calls
    // included, naming the key (or `unauthenticated`), the method and the
    // status; stopping the server writes out the queued rows.
    server.stop().await.expect("graceful stop");
    let pool = pool_options.connect_with(options.clone()).await.expect("pool");
    let rows: Vec<(String, String, String, Option<String>)> =
        sqlx::query_as("SELECT actor, action, outcome, peer FROM audit_log ORDER BY id")
            .fetch_all(&pool)
            .await
            .expect("audit rows");
    assert_eq!(
        (rows[0].0.as_str(), rows[0].1.as_str()),
        ("operator", "enroll"),
        "the fixture's enrolment: {rows:?}"
    );
    assert!(
        rows.iter()
            .all(|(.., peer)| peer.as_deref().is_some_and(|p| p.starts_with("127.0.0.1:"))),
        "every row has the peer: {rows:?}"
    );
    let mut logged: Vec<(String, String, String)> = rows[1..]
        .iter()
        .map(|(a, b, c, _)| (a.clone(), b.clone(), c.clone()))
        .collect();
    logged.sort();
    audited.sort();
    assert_eq!(logged, audited);
    // Admin calls are audited the same way; only the admin key's succeed.
    assert!(
        rows.iter()
            .any(|(actor, action, outcome, _)| actor == "ops" && action == "reload" && outcome == "ok"),
        "{rows:?}"
    );
    assert!(
        rows.iter().all(|(actor, action, outcome, _)| actor == "ops"
            || !["reload", "promote"].contains(&action.as_str())
            || outcome != "ok"),
        "only the admin key reloads or promotes: {rows:?}"
    );
    assert!(rows.iter().all(|(actor, ..)| actor != "anonymous"), "{rows:?}");
}

/// A client certificate to issue: its subject (in DER order), DNS and URI
/// subject alternative names.
type ClientSpec<'a> = (&'a [(rcgen::DnType, &'a str)], &'a [&'a str], &'a [&'a str]);

/// A CA, a server certificate for localhost, a client certificate whose
/// subject is `CN=door-7`, one of another CA, and the `extra` client
/// certificates of the CA, as PEM.
struct Pki {
    ca: String,
    server: (String, String),
    client: (String, String),
    stranger: (String, String),
    extra: Vec<(String, String)>,
}

fn pki() -> Pki {
    pki_with(&[])
}

fn pki_with(extra: &[ClientSpec<'_>]) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "handid test CA");
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA");
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let issue = |(subject, dns, uris): ClientSpec<'_>, issuer: &Issuer<'_, &KeyPair>| {
        let key = KeyPair::generate().expect("key");
        let mut params =
            CertificateParams::new(dns.iter().map(|d| (*d).to_owned()).collect::<Vec<_>>()).expect("params");
        for (kind, value) in subject {
            params.distinguished_name.push(kind.clone(), *value);
        }
        for uri in uris {
            params
                .subject_alt_names
                .push(SanType::URI((*uri).try_into().expect("ia5 uri")));
        }
        let cert = params.signed_by(&key, issuer).expect("sign");
        (cert.pem(), key.serialize_pem())
    };
    let other_key = KeyPair::generate().expect("key");
    let mut other_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    other_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    other_params
        .distinguished_name
        .push(DnType::CommonName, "someone else");
    let other = Issuer::from_params(&other_params, &other_key);
    let door_7: &[(DnType, &str)] = &[(DnType::CommonName, "door-7")];
    Pki {
        ca: ca_cert.pem(),
        server: issue(
            (&[(DnType::CommonName, "handid server")], &["localhost"], &[]),
            &issuer,
        ),
        client: issue((door_7, &[], &[]), &issuer),
        stranger: issue((door_7, &[], &[]), &other),
        extra: extra.iter().map(|spec| issue(*spec, &issuer)).collect(),
    }
}

/// A mutual-TLS server with `grants` (all of scope identify) and a
/// channel that presents `client`, once the server answers.
async fn mtls_server(
    options: &PgConnectOptions,
    pki: &Pki,
    files: &std::path::Path,
    checkpoint: &std::path::Path,
    grants: Vec<CertificateGrant>,
) -> TestServer {
    let write = |name: &str, text: &str| {
        let path = files.join(name);
        std::fs::write(&path, text).expect("write pem");
        path
    };
    let mut s = settings(options, checkpoint);
    s.tls.cert_file = Some(write("server.pem", &pki.server.0));
    s.tls.key_file = Some(write("server.key", &pki.server.1));
    s.tls.client_ca_file = Some(write("ca.pem", &pki.ca));
    s.auth.enabled = true;
    s.auth.certificates = grants;
    TestServer::start(s).await
}

/// A channel to `server` presenting `client`, retried while the server
/// starts, once its health answers SERVING.
async fn mtls_channel(server: &TestServer, pki: &Pki, client: &(String, String)) -> Channel {
    let mut channel = None;
    for _ in 0..200 {
        if let Ok(c) = tls_channel(server.addr, &pki.ca, Some(client)).await {
            channel = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let channel = channel.expect("mutual TLS connection");
    for _ in 0..100 {
        let status = HealthClient::new(channel.clone())
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|r| r.into_inner().status);
        if status.is_ok_and(|s| s == ServingStatus::Serving as i32) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    channel
}

fn grant(subject: Option<&str>, san: Option<&str>) -> CertificateGrant {
    CertificateGrant {
        subject: subject.map(str::to_owned),
        san: san.map(str::to_owned),
        scopes: vec![Scope::Identify],
        galleries: Vec::new(),
    }
}

async fn tls_channel(
    addr: std::net::SocketAddr,
    ca: &str,
    client: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = client {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://localhost:{}", addr.port()))
        .expect("url")
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

#[sqlx::test(migrations = false)]
async fn mutual_tls_names_the_caller_by_certificate_subject(
    pool_options: PgPoolOptions,
    options: PgConnectOptions,
) {
    let dir = checkpoint();
    let pki = pki();
    let files = tempfile::tempdir().expect("tempdir");
    let server = mtls_server(
        &options,
        &pki,
        files.path(),
        dir.path(),
        vec![grant(Some("CN=door-7"), None)],
    )
    .await;
    let channel = mtls_channel(&server, &pki, &pki.client).await;
    let health = |channel: Channel| async move {
        HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|r| r.into_inner().status)
    };

    // The certificate grants identify (the gallery does not exist: NOT_FOUND
    // proves the call was admitted), not enroll.
    let (got, message) = call(&channel, Rpc::Identify, None, HOME, 0).await;
    assert_eq!(got, Code::NotFound, "{message}");
    let (got, message) = call(&channel, Rpc::Enroll, None, HOME, 1).await;
    assert_eq!(got, Code::PermissionDenied, "{message}");
    assert!(message.contains("\"enroll\""), "{message}");

    // Without a client certificate, or with one from another CA, there is no
    // connection at all (or the first call fails).
    for client in [None, Some(&pki.stranger)] {
        let refused = match tls_channel(server.addr, &pki.ca, client).await {
            Err(_) => true,
            Ok(channel) => health(channel).await.is_err(),
        };
        assert!(refused, "a client without a valid certificate was served");
    }
    // Plain text is not served either.
    let plain = HandIdClient::connect(format!("http://{}", server.addr)).await;
    if let Ok(mut plain) = plain {
        let status = plain
            .embed(pb::EmbedRequest { images: Vec::new() })
            .await
            .expect_err("plain text on a TLS port");
        assert_ne!(status.code(), Code::InvalidArgument);
    }

    server.stop().await.expect("graceful stop");
    let pool: PgPool = pool_options.connect_with(options.clone()).await.expect("pool");
    let actors: Vec<(String, String, String)> =
        sqlx::query_as("SELECT actor, action, outcome FROM audit_log ORDER BY id")
            .fetch_all(&pool)
            .await
            .expect("audit");
    let row = |action: &str, outcome: &str| ("CN=door-7".to_owned(), action.to_owned(), outcome.to_owned());
    assert_eq!(
        actors,
        [row("identify", "NOT_FOUND"), row("enroll", "PERMISSION_DENIED")]
    );
}

#[sqlx::test(migrations = false)]
async fn certificate_grants_match_the_parsed_subject_or_a_san_and_cannot_be_impersonated(
    pool_options: PgPoolOptions,
    options: PgConnectOptions,
) {
    use rcgen::DnType::{CommonName as Cn, OrganizationName as O, OrganizationalUnitName as Ou};
    let dir = checkpoint();
    // Each client certificate, and the grant it must get (None: refused).
    let clients: [(ClientSpec<'_>, Option<&str>); 9] = [
        // The grant as the operator guide writes it, and the certificate's
        // subject in its usual order (O first in DER).
        (
            (&[(O, "Example"), (Cn, "desk")], &[], &[]),
            Some("CN=desk,O=Example"),
        ),
        (
            (&[(Cn, "desk"), (O, "Example")], &[], &[]),
            Some("CN=desk,O=Example"),
        ),
        // Values that display like the granted subject: one attribute each.
        ((&[(O, "Evil, CN=desk")], &[], &[]), None),
        ((&[(O, "Example, CN=desk")], &[], &[]), None),
        ((&[(Cn, "desk,O=Example")], &[], &[]), None),
        // One attribute more.
        ((&[(O, "Example"), (Cn, "desk"), (Ou, "x")], &[], &[]), None),
        // Subject alternative names: DNS (any case) and URI.
        (
            (&[(Cn, "door-7")], &["Door-7.example"], &[]),
            Some("dns:door-7.example"),
        ),
        (
            (&[(Cn, "door-9")], &[], &["spiffe://site/door-9"]),
            Some("uri:spiffe://site/door-9"),
        ),
        // A longer DNS name, and a subject that is the granted SAN's text.
        (
            (&[(Cn, "dns:door-7.example")], &["door-7.example.evil"], &[]),
            None,
        ),
    ];
    let pki = pki_with(&clients.map(|(spec, _)| spec));
    let files = tempfile::tempdir().expect("tempdir");
    let server = mtls_server(
        &options,
        &pki,
        files.path(),
        dir.path(),
        vec![
            grant(Some("CN=desk,O=Example"), None),
            grant(None, Some("dns:door-7.example")),
            grant(None, Some("uri:spiffe://site/door-9")),
        ],
    )
    .await;
    let mut audited = Vec::new();
    for (i, (certificate, (spec, want))) in pki.extra.iter().zip(&clients).enumerate() {
        let channel = mtls_channel(&server, &pki, certificate).await;
        // Admitted calls find no gallery; refused ones never get that far.
        let (got, message) = call(&channel, Rpc::Identify, None, HOME, i).await;
        match want {
            Some(_) => {
                assert_eq!(got, Code::NotFound, "client {i} {spec:?}: {message}");
                audited.push((want.unwrap_or_default().to_owned(), "NOT_FOUND".to_owned()));
            }
            None => {
                assert_eq!(got, Code::PermissionDenied, "client {i} {spec:?}: {message}");
                assert!(message.contains("has no grant in auth.certificates"), "{message}");
                audited.push(("unauthenticated".to_owned(), "PERMISSION_DENIED".to_owned()));
            }
        }
    }
    // The audit log names each admitted certificate by its grant.
    server.stop().await.expect("graceful stop");
    let pool: PgPool = pool_options.connect_with(options.clone()).await.expect("pool");
    let mut rows: Vec<(String, String)> =
        sqlx::query_as("SELECT actor, outcome FROM audit_log WHERE action = 'identify'")
            .fetch_all(&pool)
            .await
            .expect("audit");
    rows.sort();
    audited.sort();
    assert_eq!(rows, audited);
}

#[sqlx::test(migrations = false)]
async fn tls_without_client_certificates_serves_api_keys(_: PgPoolOptions, options: PgConnectOptions) {
    let dir = checkpoint();
    let pki = pki();
    let files = tempfile::tempdir().expect("tempdir");
    let cert = files.path().join("server.pem");
    let key_file = files.path().join("server.key");
    std::fs::write(&cert, &pki.server.0).expect("write");
    std::fs::write(&key_file, &pki.server.1).expect("write");
    let secret = generate_key();
    let mut s = settings(&options, dir.path());
    s.tls.cert_file = Some(cert);
    s.tls.key_file = Some(key_file);
    s.auth.enabled = true;
    s.auth.keys = vec![key("reader", &secret, &[Scope::Embed], &[])];
    let server = TestServer::start(s).await;
    let mut channel = None;
    for _ in 0..200 {
        if let Ok(c) = tls_channel(server.addr, &pki.ca, None).await {
            channel = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let channel = channel.expect("TLS connection");
    let (got, message) = call(&channel, Rpc::Embed, Some(&secret), HOME, 0).await;
    assert_eq!(got, Code::Ok, "{message}");
    let (got, _) = call(&channel, Rpc::Embed, None, HOME, 0).await;
    assert_eq!(got, Code::Unauthenticated);
    server.stop().await.expect("graceful stop");
}

#[sqlx::test(migrations = false)]
async fn the_documented_x_api_key_metadata_is_accepted(_: PgPoolOptions, options: PgConnectOptions) {
    let dir = checkpoint();
    let secret = generate_key();
    let mut s = settings(&options, dir.path());
    s.auth.enabled = true;
    s.auth.keys = vec![key("reader", &secret, &[Scope::Identify], &[])];
    let server = TestServer::start(s).await;
    let mut client = server.client().await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let list = |headers: &[(&'static str, String)]| {
        let mut request = Request::new(pb::ListSubjectsRequest {
            gallery_id: HOME.to_owned(),
            page_size: 0,
            page_token: String::new(),
        });
        for (name, value) in headers {
            request
                .metadata_mut()
                .insert(*name, value.parse().expect("ascii"));
        }
        request
    };
    // Admitted: the gallery does not exist, which only an admitted call
    // can find out.
    for headers in [
        vec![("x-api-key", secret.clone())],
        vec![("authorization", format!("Bearer {secret}"))],
        vec![
            ("x-api-key", secret.clone()),
            ("authorization", format!("Bearer {secret}")),
        ],
    ] {
        let status = client
            .list_subjects(list(&headers))
            .await
            .expect_err("no gallery");
        assert_eq!(status.code(), Code::NotFound, "{headers:?}: {status:?}");
    }
    for (headers, says) in [
        (vec![("x-api-key", "hid_wrong".to_owned())], "not valid"),
        (
            vec![
                ("x-api-key", "hid_wrong".to_owned()),
                ("authorization", format!("Bearer {secret}")),
            ],
            "different keys",
        ),
    ] {
        let status = client.list_subjects(list(&headers)).await.expect_err("refused");
        assert_eq!(status.code(), Code::Unauthenticated, "{headers:?}");
        assert!(status.message().contains(says), "{}", status.message());
    }
    server.stop().await.expect("graceful stop");
}

#[sqlx::test(migrations = false)]
async fn idempotency_keys_belong_to_their_caller_and_gallery(_: PgPoolOptions, options: PgConnectOptions) {
    let dir = checkpoint();
    let (desk_a, desk_b) = (generate_key(), generate_key());
    let mut s = settings(&options, dir.path());
    s.auth.enabled = true;
    s.auth.keys = vec![
        key("desk-a", &desk_a, &[Scope::Enroll], &[]),
        key("desk-b", &desk_b, &[Scope::Enroll], &[]),
    ];
    let server = TestServer::start(s).await;
    let mut client = server.client().await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let photos = common::people(2, 1);
    let (alice, bob) = (&photos[0].1[0], &photos[1].1[0]);
    let enroll = |gallery: &str, subject: &str, photo: &[u8], who: &str| {
        with_key(
            pb::EnrollRequest {
                gallery_id: gallery.to_owned(),
                subject_id: subject.to_owned(),
                images: vec![pb::Image { data: photo.to_vec() }],
                idempotency_key: "retry-1".to_owned(),
            },
            Some(who),
        )
    };
    let first = client
        .enroll(enroll("g", "alice", alice, &desk_a))
        .await
        .expect("first")
        .into_inner();
    let retry = client
        .enroll(enroll("g", "alice", alice, &desk_a))
        .await
        .expect("retry")
        .into_inner();
    assert!(retry.replayed);
    assert_eq!(retry.template_ids, first.template_ids);
    // The same key, another caller or another gallery: not a replay.
    for (gallery, who) in [("g", &desk_b), ("other", &desk_a)] {
        let stored = client
            .enroll(enroll(gallery, "alice", alice, who))
            .await
            .expect("another scope")
            .into_inner();
        assert!(!stored.replayed, "{gallery}");
        assert_ne!(stored.template_ids, first.template_ids);
    }
    // The same caller, gallery and key with other content: ALREADY_EXISTS.
    for (subject, photo) in [("alice", bob), ("bob", alice)] {
        let status = client
            .enroll(enroll("g", subject, photo, &desk_a))
            .await
            .expect_err("other content");
        assert_eq!(status.code(), Code::AlreadyExists, "{subject}: {status:?}");
        assert!(
            status.message().contains("idempotency_key"),
            "{}",
            status.message()
        );
    }
    server.stop().await.expect("graceful stop");
}

#[sqlx::test(migrations = false)]
async fn a_listener_other_hosts_reach_needs_tls_or_allow_plaintext(
    _: PgPoolOptions,
    options: PgConnectOptions,
) {
    // Settings: refused, naming the setting that allows it.
    let open = "server:\n  listen: 0.0.0.0:50051\n";
    let error = Settings::from_yaml_and_env(open, Vec::new())
        .expect_err("plain text on 0.0.0.0")
        .to_string();
    assert!(
        error.contains("server.listen") && error.contains("server.allow_plaintext: true"),
        "{error}"
    );
    for yaml in [
        format!("{open}  allow_plaintext: true\n"),
        "server:\n  listen: '[::1]:50051'\n".to_owned(),
        "server:\n  listen: 127.0.0.1:50051\n".to_owned(),
        format!("{open}tls:\n  cert_file: server.pem\n  key_file: server.key\n"),
    ] {
        Settings::from_yaml_and_env(&yaml, Vec::new()).unwrap_or_else(|e| panic!("{yaml}: {e}"));
    }
    Settings::from_yaml_and_env(
        open,
        [("HANDID__SERVER__ALLOW_PLAINTEXT".to_owned(), "true".to_owned())],
    )
    .expect("allowed from the environment");

    // `serve` with such a file stops before it touches anything.
    let files = tempfile::tempdir().expect("tempdir");
    let config = files.path().join("server.yaml");
    std::fs::write(&config, "server:\n  listen: 0.0.0.0:0\n").expect("write settings");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_handid-server"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .env_remove("HANDID__SERVER__ALLOW_PLAINTEXT")
        .output()
        .expect("run serve");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("server.allow_plaintext"), "{stderr}");

    // `run` judges the listener it is given, whatever `server.listen` says.
    let dir = checkpoint();
    let s = settings(&options, dir.path());
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.expect("bind");
    let error = handid_server::run(listener, s.clone(), std::future::pending())
        .await
        .expect_err("plain text on 0.0.0.0");
    assert!(
        matches!(error, handid_server::ServeError::Plaintext(_)),
        "{error:?}"
    );
    assert!(
        error.to_string().contains("server.allow_plaintext: true"),
        "{error}"
    );
    // Allowed: it serves (reached here over loopback).
    let mut allowed = s;
    allowed.server.allow_plaintext = true;
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.expect("bind");
    let server = TestServer::start_on(listener, allowed);
    server.client().await;
    wait_for_health(&server, ServingStatus::Serving).await;
    server.stop().await.expect("graceful stop");
}

#[sqlx::test(migrations = false)]
async fn a_settings_reload_cannot_turn_auth_off(pool_options: PgPoolOptions, options: PgConnectOptions) {
    let dir = checkpoint();
    let files = tempfile::tempdir().expect("tempdir");
    let config = files.path().join("server.yaml");
    let write = |s: &Settings| {
        std::fs::write(&config, serde_yaml::to_string(s).expect("yaml")).expect("write settings");
    };
    let (ops, reader) = (generate_key(), generate_key());
    let mut s = settings(&options, dir.path());
    s.auth.enabled = true;
    s.auth.keys = vec![
        key("ops", &ops, &[Scope::Admin], &[]),
        key("reader", &reader, &[Scope::Identify], &[]),
    ];
    write(&s);
    s.file = Some(config.clone());
    let server = TestServer::start(s.clone()).await;
    server.client().await;
    wait_for_health(&server, ServingStatus::Serving).await;
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut admin = AdminClient::new(channel.clone());

    // The file now turns auth off: ReloadSettings refuses it, naming the
    // way that is allowed.
    let mut open = s.clone();
    open.auth.enabled = false;
    write(&open);
    let refused = admin
        .reload_settings(with_key(pb::ReloadSettingsRequest {}, Some(&ops)))
        .await
        .expect_err("auth turned off by a reload");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("auth.enabled: false") && refused.message().contains("restart"),
        "{}",
        refused.message()
    );

    // Auth is still on, with the same keys.
    let (got, message) = call(&channel, Rpc::ListSubjects, None, GONE, 0).await;
    assert_eq!(got, Code::Unauthenticated, "{message}");
    let (got, message) = call(&channel, Rpc::ListSubjects, Some(&reader), GONE, 0).await;
    assert_eq!(got, Code::NotFound, "the reader key still works: {message}");
    let (got, message) = call(&channel, Rpc::GetModel, Some(&reader), GONE, 0).await;
    assert_eq!(got, Code::PermissionDenied, "{message}");
    let (got, message) = call(&channel, Rpc::GetModel, Some(&ops), GONE, 0).await;
    assert_eq!(got, Code::Ok, "the admin key still works: {message}");

    // The audit log records the refusal, by whom and why.
    let pool = pool_options.connect_with(options.clone()).await.expect("pool");
    let mut rows: Vec<(String, String, String)> = Vec::new();
    for _ in 0..100 {
        rows = sqlx::query_as(
            "SELECT actor, outcome, detail::text FROM audit_log WHERE action = 'reload_settings' ORDER BY id",
        )
        .fetch_all(&pool)
        .await
        .expect("audit rows");
        if !rows.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (rows[0].0.as_str(), rows[0].1.as_str()),
        ("ops", "FAILED_PRECONDITION")
    );
    assert!(rows[0].2.contains("auth.enabled: false"), "{}", rows[0].2);

    // The same file with auth on applies as usual.
    write(&s);
    admin
        .reload_settings(with_key(pb::ReloadSettingsRequest {}, Some(&ops)))
        .await
        .expect("a file that keeps auth on");
    server.stop().await.expect("graceful stop");
}
