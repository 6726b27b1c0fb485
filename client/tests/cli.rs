//! The `handid` binary against a real server (in this process, over a real
//! Postgres): enrol, identify (from a file, from stdin, a held-out photo),
//! verify, list, get, delete, and the exit status of each kind of refusal.

use std::path::{Path, PathBuf};
use std::process::Output;

use handid_server::Settings;
use handid_server::settings::{ApiKeySettings, Scope};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// The photo folder of the 11k Hands sample (`../shared/data`).
fn sample_dir() -> PathBuf {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    Path::new(&manifest).join("../../shared/data/11k-hands-sample/Hands")
}

/// Photos of the 11k Hands sample.
fn photos(count: usize) -> Vec<PathBuf> {
    let dir = sample_dir();
    let mut all: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "jpg"))
        .collect();
    all.sort();
    all.truncate(count);
    assert_eq!(all.len(), count, "the sample has too few photos");
    all
}

fn key(id: &str, key: &str, scopes: &[Scope]) -> ApiKeySettings {
    ApiKeySettings {
        id: id.to_owned(),
        sha256: handid_server::auth::hash_key(key),
        scopes: scopes.to_vec(),
        galleries: Vec::new(),
    }
}

/// Runs `handid ARGS` against `addr` with `api_key` (none when empty),
/// feeding `stdin`.
async fn handid(addr: &str, api_key: &str, args: &[&str], stdin: Option<&Path>) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_handid"));
    command
        .args(["--addr", addr])
        .args(args)
        .env_remove("HANDID_ADDR");
    if api_key.is_empty() {
        command.env_remove("HANDID_API_KEY");
    } else {
        command.env("HANDID_API_KEY", api_key);
    }
    if let Some(file) = stdin {
        command.stdin(std::fs::File::open(file).expect("stdin file"));
    }
    command.output().await.expect("run handid")
}

fn json(output: &Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "{:?}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("one JSON object")
}

fn status(output: &Output) -> i32 {
    output.status.code().expect("exit status")
}

/// Settings for a test server over the Postgres of `options`, migrating
/// it, serving a random tiny model: the model's folder (keep it) and the
/// settings.
fn model_settings(options: &PgConnectOptions) -> (tempfile::TempDir, Settings) {
    let model = tempfile::tempdir().expect("model");
    handid_model::create_random_checkpoint(model.path(), &handid_model::ClipVisionConfig::tiny_vit(), 3)
        .expect("checkpoint");
    let mut settings = Settings::default();
    settings.database.url = format!(
        "postgres://{}@{}:{}/{}",
        options.get_username(),
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("postgres")
    );
    settings.database.migrate_on_start = true;
    settings.model.path = model.path().to_owned();
    (model, settings)
}

/// A server on a free local port with a random tiny model and these API
/// keys, once it says SERVING: the model's folder (keep it), the address, and
/// the stop handles.
async fn serve(
    options: &PgConnectOptions,
    keys: Vec<ApiKeySettings>,
) -> (
    tempfile::TempDir,
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), handid_server::ServeError>>,
) {
    serve_with(options, keys, |_| {}).await
}

/// [`serve`] with its settings changed by `tweak` before the server starts.
async fn serve_with(
    options: &PgConnectOptions,
    keys: Vec<ApiKeySettings>,
    tweak: impl FnOnce(&mut Settings),
) -> (
    tempfile::TempDir,
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), handid_server::ServeError>>,
) {
    let (model, mut settings) = model_settings(options);
    settings.auth.keys = keys;
    tweak(&mut settings);
    // Bulk enrolment from one address: the per-caller limit is for doors.
    settings.server.rate_limit_per_second = 0.0;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(handid_server::run(listener, settings, async {
        let _ = stopped.await;
    }));
    let mut ready = false;
    for _ in 0..200 {
        if handid(&addr, "", &["health"], None).await.status.success() {
            ready = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(ready, "the server never said SERVING");
    (model, addr, stop, server)
}

#[sqlx::test(migrations = false)]
async fn a_bulk_enrolment_resumes_without_duplicates_and_lists_its_failures(
    pool_options: PgPoolOptions,
    options: PgConnectOptions,
) {
    let desk = "hid_desk_key";
    let (_model, addr, stop, server) = serve(&options, vec![key("desk", desk, &[Scope::Enroll])]).await;
    // A site: 10 people of 2 photos each, one folder per person, and one
    // whose only file is not an image.
    let site = tempfile::tempdir().expect("site");
    let photos = photos(20);
    for (i, pair) in photos.chunks(2).enumerate() {
        let dir = site.path().join(format!("p{i:02}"));
        std::fs::create_dir(&dir).expect("mkdir");
        for photo in pair {
            std::fs::copy(photo, dir.join(photo.file_name().expect("name"))).expect("copy");
        }
    }
    // A hidden file beside the photos is not sent as one.
    std::fs::write(site.path().join("p00/.DS_Store"), b"finder").expect("write");
    std::fs::create_dir(site.path().join("broken")).expect("mkdir");
    std::fs::write(site.path().join("broken/scan.jpg"), b"not a photo").expect("write");
    // The run that was cut short: the first four people, as a CSV.
    let csv = site.path().join("first.csv");
    let lines: Vec<String> = photos[..8]
        .iter()
        .enumerate()
        .map(|(n, photo)| {
            format!(
                "p{:02},p{:02}/{}",
                n / 2,
                n / 2,
                photo.file_name().expect("name").to_string_lossy()
            )
        })
        .collect();
    std::fs::write(&csv, format!("subject,image\n{}\n", lines.join("\n"))).expect("csv");
    let csv = csv.to_str().expect("utf-8").to_owned();
    let first = json(
        &handid(
            &addr,
            desk,
            &["--json", "enroll", "--gallery", "site", "--from", &csv],
            None,
        )
        .await,
    );
    assert_eq!(
        (first["enrolled"].as_u64(), first["templates"].as_u64()),
        (Some(4), Some(8))
    );

    // The whole site: the four are replayed, the six others stored, the
    // broken one listed with its reason; the exit status is its refusal's.
    let folder = site.path().to_str().expect("utf-8").to_owned();
    let run = handid(
        &addr,
        desk,
        &[
            "--json",
            "enroll",
            "--gallery",
            "site",
            "--from",
            &folder,
            "--concurrency",
            "3",
        ],
        None,
    )
    .await;
    assert_eq!(
        status(&run),
        13,
        "INVALID_ARGUMENT: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&run.stdout).expect("one JSON object");
    assert_eq!(summary["enrolled"], 6, "{summary}");
    assert_eq!(summary["templates"], 12, "{summary}");
    assert_eq!(summary["already_enrolled"], 4, "{summary}");
    let failed = summary["failed"].as_array().expect("failures");
    assert_eq!(failed.len(), 1, "{summary}");
    assert_eq!(failed[0]["subject_id"], "broken");
    assert_eq!(failed[0]["code"], "INVALID_ARGUMENT");
    assert!(
        !failed[0]["reason"].as_str().unwrap_or("").is_empty(),
        "{summary}"
    );

    // No subject or template twice.
    let pool = pool_options.connect_with(options).await.expect("pool");
    let (subjects, templates): (i64, i64) =
        sqlx::query_as("SELECT (SELECT count(*) FROM subjects), (SELECT count(*) FROM templates)")
            .fetch_one(&pool)
            .await
            .expect("counts");
    assert_eq!((subjects, templates), (10, 20));
    // Run again: everything is already there.
    let again = handid(
        &addr,
        desk,
        &["--json", "enroll", "--gallery", "site", "--from", &folder],
        None,
    )
    .await;
    let again: serde_json::Value = serde_json::from_slice(&again.stdout).expect("one JSON object");
    assert_eq!(
        (again["enrolled"].as_u64(), again["already_enrolled"].as_u64()),
        (Some(0), Some(10))
    );
    // A run killed part way (SIGKILL, nothing flushed), then run again:
    // 60 people of one photo each into another gallery.
    let crowd = tempfile::tempdir().expect("crowd");
    for (i, photo) in self::photos(80)[20..].iter().enumerate() {
        let dir = crowd.path().join(format!("c{i:02}"));
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::copy(photo, dir.join("hand.jpg")).expect("copy");
    }
    let crowd_path = crowd.path().to_str().expect("utf-8").to_owned();
    let crowd_args = [
        "--json",
        "enroll",
        "--gallery",
        "crowd",
        "--from",
        &crowd_path,
        "--concurrency",
        "1",
    ];
    let mut cut = tokio::process::Command::new(env!("CARGO_BIN_EXE_handid"))
        .args(["--addr", &addr])
        .args(crowd_args)
        .env("HANDID_API_KEY", desk)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn handid");
    let crowd_count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM subjects WHERE gallery_id = 'crowd'")
            .fetch_one(&pool)
            .await
            .expect("count")
    };
    while crowd_count().await < 3 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    cut.kill().await.expect("kill");
    let before = crowd_count().await;
    let resumed = json(&handid(&addr, desk, &crowd_args, None).await);
    let (enrolled, replayed) = (
        resumed["enrolled"].as_i64().expect("enrolled"),
        resumed["already_enrolled"].as_i64().expect("already"),
    );
    assert_eq!(enrolled + replayed, 60, "{resumed}");
    assert!(
        replayed >= before.min(60),
        "{before} stored before the kill, {resumed}"
    );
    let (subjects, templates): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM subjects WHERE gallery_id = 'crowd'),
                (SELECT count(*) FROM templates WHERE gallery_id = 'crowd')",
    )
    .fetch_one(&pool)
    .await
    .expect("counts");
    assert_eq!((subjects, templates), (60, 60), "no duplicates after the kill");

    // A --from that is neither a folder of subjects nor a CSV is refused
    // before anything is sent (a local problem: exit 1).
    let empty = tempfile::tempdir().expect("empty");
    let refused = handid(
        &addr,
        desk,
        &[
            "enroll",
            "--gallery",
            "site",
            "--from",
            empty.path().to_str().expect("utf-8"),
        ],
        None,
    )
    .await;
    assert_eq!(status(&refused), 1);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no subfolder"));

    let _ = stop.send(());
    server.await.expect("server task").expect("clean stop");
}

#[sqlx::test(migrations = false)]
async fn the_cli_enrols_identifies_and_exits_with_the_grpc_status(
    _: PgPoolOptions,
    options: PgConnectOptions,
) {
    let (desk, door) = ("hid_desk_key", "hid_door_key");
    let (model, addr, stop, server) = serve(
        &options,
        vec![
            key("desk", desk, &[Scope::Identify, Scope::Enroll]),
            key("door", door, &[Scope::Identify, Scope::Embed]),
        ],
    )
    .await;

    let photos = photos(3);
    let path = |i: usize| photos[i].to_str().expect("utf-8 path").to_owned();
    let (p0, p1, p2) = (path(0), path(1), path(2));
    let enrolled = json(
        &handid(
            &addr,
            desk,
            &[
                "--json",
                "enroll",
                "--gallery",
                "site",
                "--subject",
                "alice",
                &p0,
                &p1,
            ],
            None,
        )
        .await,
    );
    assert_eq!(enrolled["template_count"], 2);
    json(
        &handid(
            &addr,
            desk,
            &["--json", "enroll", "--gallery", "site", "--subject", "bob", &p2],
            None,
        )
        .await,
    );

    // Identify from a file and from stdin: the enrolled photo finds its
    // subject.
    let identify = ["--json", "identify", "--gallery", "site", "--threshold", "0.5"];
    let found = json(&handid(&addr, door, &[&identify[..], &[p0.as_str()]].concat(), None).await);
    assert_eq!(found["matched_subject_id"], "alice");
    assert_eq!(found["gallery_size"], 2);
    assert!(found["candidates"][0]["score"].as_f64().expect("score") > 0.999);
    let piped = json(&handid(&addr, door, &[&identify[..], &["-"]].concat(), Some(&photos[2])).await);
    assert_eq!(piped["matched_subject_id"], "bob");
    let human = handid(&addr, door, &[&identify[1..], &[p0.as_str()]].concat(), None).await;
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.starts_with("match: alice"), "{text}");

    // A held-out photo: four people enrolled from one dorsal-right photo
    // each (HandInfo.csv: persons 0000000, 0000505, 0000008, 0001515), then
    // another photo of the first, never enrolled, taken moments after her
    // enrolled one. The random tiny model has learned no identity, but two
    // captures of one hand in one session stay nearest to each other.
    let sample = |name: &str| sample_dir().join(name).to_str().expect("utf-8 path").to_owned();
    for (subject, photo) in [
        ("ada", "Hand_0000005.jpg"),
        ("ben", "Hand_0000133.jpg"),
        ("cyd", "Hand_0000239.jpg"),
        ("dee", "Hand_0000311.jpg"),
    ] {
        let args = ["enroll", "--gallery", "held-out", "--subject", subject];
        let enrolled = handid(
            &addr,
            desk,
            &[&args[..], &[sample(photo).as_str()]].concat(),
            None,
        )
        .await;
        assert_eq!(
            status(&enrolled),
            0,
            "{}",
            String::from_utf8_lossy(&enrolled.stderr)
        );
    }
    // An idempotency key replays its first enrolment, and is refused with
    // other content: ALREADY_EXISTS (16).
    let keyed = |subject: &'static str| {
        [
            "enroll",
            "--gallery",
            "held-out",
            "--subject",
            subject,
            "--idempotency-key",
            "k1",
        ]
    };
    let first = handid(
        &addr,
        desk,
        &[&keyed("eve")[..], &[sample("Hand_0000102.jpg").as_str()]].concat(),
        None,
    )
    .await;
    assert_eq!(status(&first), 0);
    let again = handid(
        &addr,
        desk,
        &[&keyed("eve")[..], &[sample("Hand_0000102.jpg").as_str()]].concat(),
        None,
    )
    .await;
    assert_eq!(status(&again), 0, "a replay succeeds");
    let other = handid(
        &addr,
        desk,
        &[&keyed("fay")[..], &[sample("Hand_0000102.jpg").as_str()]].concat(),
        None,
    )
    .await;
    assert_eq!(status(&other), 16, "{}", String::from_utf8_lossy(&other.stderr));
    let held_out = sample("Hand_0000006.jpg");
    let args = [
        "identify",
        "--gallery",
        "held-out",
        "--threshold",
        "0.5",
        held_out.as_str(),
    ];
    let human = handid(&addr, door, &args, None).await;
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.starts_with("match: ada"), "{text}");
    // Scores and thresholds come back as written, not widened from f32.
    let args = [
        "--json",
        "identify",
        "--gallery",
        "held-out",
        "--threshold",
        "0.9",
        held_out.as_str(),
    ];
    let found = json(&handid(&addr, door, &args, None).await);
    assert_eq!(found["decision"]["threshold"], serde_json::json!(0.9));
    // TLS options with a plain-text address: refused before anything is
    // sent (tonic would speak plain text).
    let plain = addr.replace("https://", "http://");
    let mixed = handid(
        &plain,
        door,
        &["--tls-ca", "/nonexistent.pem", "model", "get"],
        None,
    )
    .await;
    assert_eq!(status(&mixed), 1);
    assert!(String::from_utf8_lossy(&mixed.stderr).contains("https://"));

    // Verify.
    let verified = json(
        &handid(
            &addr,
            door,
            &[
                "--json",
                "verify",
                "--gallery",
                "site",
                "--subject",
                "alice",
                "--threshold",
                "0.5",
                &p1,
            ],
            None,
        )
        .await,
    );
    assert_eq!(verified["decision"]["is_match"], true);

    // The checkpoint has no calibrated thresholds: the default rule is
    // FAILED_PRECONDITION (exit 10 + 9), saying why on stderr.
    let refused = handid(&addr, door, &["identify", "--gallery", "site", &p0], None).await;
    assert_eq!(status(&refused), 19);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("FAILED_PRECONDITION"), "{stderr}");
    // No key: UNAUTHENTICATED (26); the door's key cannot enrol:
    // PERMISSION_DENIED (17); an unknown gallery: NOT_FOUND (15).
    let list = ["subjects", "list", "--gallery", "site"];
    assert_eq!(status(&handid(&addr, "", &list, None).await), 26);
    let enrol_eve = ["enroll", "--gallery", "site", "--subject", "eve"];
    assert_eq!(
        status(&handid(&addr, door, &[&enrol_eve[..], &[p0.as_str()]].concat(), None).await),
        17
    );
    let nowhere = [
        "identify",
        "--gallery",
        "nowhere",
        "--threshold",
        "0.5",
        p0.as_str(),
    ];
    assert_eq!(status(&handid(&addr, door, &nowhere, None).await), 15);
    // A file that is not there: a local error (1), nothing sent.
    assert_eq!(
        status(
            &handid(
                &addr,
                desk,
                &[&enrol_eve[..], &["/nonexistent.jpg"]].concat(),
                None
            )
            .await
        ),
        1
    );

    // Embed into a NumPy file: [2, dim] float32, unit rows.
    let out = model.path().join("vectors.npy");
    let out_arg = out.to_str().expect("utf-8 path");
    let embedded = json(
        &handid(
            &addr,
            door,
            &["--json", "embed", "--out", out_arg, &p0, &p1],
            None,
        )
        .await,
    );
    let dim = embedded["dimension"].as_u64().expect("dimension") as usize;
    let bytes = std::fs::read(&out).expect("npy file");
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    assert_eq!((10 + header_len) % 64, 0, "the header is padded to 64 bytes");
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).expect("header");
    assert!(header.contains(&format!("'shape': (2, {dim})")), "{header}");
    assert!(header.contains("'<f4'"), "{header}");
    let values: Vec<f32> = bytes[10 + header_len..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(values.len(), 2 * dim);
    for row in values.chunks(dim) {
        let norm: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-3, "{norm}");
    }

    // A reader that stops early (`| grep -q`, `| head`) is no failure: the
    // exit status is the call's, nothing panics.
    let closed = tokio::process::Command::new("bash")
        .args([
            "-c",
            "set -o pipefail; \"$0\" --addr \"$1\" subjects list --gallery site | (exec 0<&-; sleep 1)",
            env!("CARGO_BIN_EXE_handid"),
            &addr,
        ])
        .env("HANDID_API_KEY", door)
        .output()
        .await
        .expect("bash");
    assert!(
        closed.status.success(),
        "{:?}: {}",
        closed.status,
        String::from_utf8_lossy(&closed.stderr)
    );

    // List, get, delete.
    let listed = json(&handid(&addr, door, &[&["--json"][..], &list[..]].concat(), None).await);
    let ids: Vec<&str> = listed["subjects"]
        .as_array()
        .expect("subjects")
        .iter()
        .map(|s| s["subject_id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, ["alice", "bob"]);
    let get = |subject: &'static str| {
        [
            "--json",
            "subjects",
            "get",
            "--gallery",
            "site",
            "--subject",
            subject,
        ]
    };
    let alice = json(&handid(&addr, door, &get("alice"), None).await);
    assert_eq!(alice["templates"].as_array().expect("templates").len(), 2);
    assert!(alice["templates"][0]["created_at"].is_string());
    let delete_bob = [
        "--json",
        "subjects",
        "delete",
        "--gallery",
        "site",
        "--subject",
        "bob",
    ];
    assert_eq!(
        json(&handid(&addr, desk, &delete_bob, None).await)["templates_deleted"],
        1
    );
    assert_eq!(status(&handid(&addr, door, &get("bob"), None).await), 15);
    let erased = json(
        &handid(
            &addr,
            desk,
            &["--json", "gallery", "delete", "--gallery", "site"],
            None,
        )
        .await,
    );
    assert_eq!(erased["subjects_deleted"], 1);

    let _ = stop.send(());
    server.await.expect("server task").expect("clean stop");
    // Nobody listens any more: UNAVAILABLE (24).
    assert_eq!(status(&handid(&addr, door, &["model", "get"], None).await), 24);
}

#[sqlx::test(migrations = false)]
async fn model_cancel_abandons_a_staged_migration(_: PgPoolOptions, options: PgConnectOptions) {
    let operator = "hid_operator_key";
    let (model, addr, stop, server) = serve(
        &options,
        vec![key("operator", operator, &[Scope::Admin, Scope::Enroll])],
    )
    .await;
    let active = handid_model::Manifest::read(model.path()).expect("the active model's manifest");
    let other = tempfile::tempdir().expect("other model");
    let staged =
        handid_model::create_random_checkpoint(other.path(), &handid_model::ClipVisionConfig::tiny_vit(), 4)
            .expect("checkpoint");
    let other_path = other.path().to_str().expect("utf-8 path").to_owned();
    let stage = [
        "--json",
        "model",
        "reload",
        "--stage",
        "--path",
        other_path.as_str(),
    ];

    // Nothing staged: FAILED_PRECONDITION (19), saying so.
    let refused = handid(&addr, operator, &["model", "cancel"], None).await;
    assert_eq!(status(&refused), 19);
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("no model is staged"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // Staged, one dual enrolment, cancelled: its staged template goes.
    assert_eq!(json(&handid(&addr, operator, &stage, None).await)["staged"], true);
    let photo = photos(1).remove(0);
    let photo = photo.to_str().expect("utf-8 path");
    let enrol = ["enroll", "--gallery", "site", "--subject", "alice", photo];
    assert_eq!(status(&handid(&addr, operator, &enrol, None).await), 0);
    let cancelled = json(&handid(&addr, operator, &["--json", "model", "cancel"], None).await);
    assert_eq!(cancelled["active"]["model_id"], active.model_id);
    assert_eq!(cancelled["cancelled"]["model_id"], staged.model_id);
    assert_eq!(cancelled["cancelled"]["path"], other_path);
    assert_eq!(cancelled["templates_deleted"], 1);
    assert_eq!(cancelled["templates_kept"], 0);
    assert_eq!(cancelled["subjects_without_active_templates"], 0);
    assert_eq!(cancelled["rollback_target"], false);
    let report = json(&handid(&addr, operator, &["--json", "model", "get"], None).await);
    assert!(report["staged"].is_null(), "{report}");

    // Staged again from zero coverage; the summary names both models.
    json(&handid(&addr, operator, &stage, None).await);
    let report = json(&handid(&addr, operator, &["--json", "model", "get"], None).await);
    assert_eq!(report["coverage"][0]["subjects_with_staged_templates"], 0);
    let human = handid(&addr, operator, &["model", "cancel"], None).await;
    assert_eq!(status(&human), 0);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.starts_with(&format!(
            "active: {} from {} (cancelled {}: 0 templates deleted, 0 kept)",
            active.model_id,
            model.path().display(),
            staged.model_id
        )),
        "{text}"
    );

    let _ = stop.send(());
    server.await.expect("server task").expect("clean stop");
}

#[sqlx::test(migrations = false)]
async fn model_get_names_the_side_information_model(_: PgPoolOptions, options: PgConnectOptions) {
    let operator = "hid_operator_key";
    let side = tempfile::tempdir().expect("side-information model");
    let side_manifest =
        handid_model::create_random_checkpoint(side.path(), &handid_model::ClipVisionConfig::tiny_vit(), 5)
            .expect("checkpoint");
    let side_path = side.path().to_owned();
    let (model, addr, stop, server) =
        serve_with(&options, vec![key("operator", operator, &[Scope::Admin])], |s| {
            s.model.side_info = Some(side_path)
        })
        .await;
    let active = handid_model::Manifest::read(model.path()).expect("the active model's manifest");
    assert_ne!(active.model_id, side_manifest.model_id);

    let report = json(&handid(&addr, operator, &["--json", "model", "get"], None).await);
    assert_eq!(
        report["side_info"]["model_id"], side_manifest.model_id,
        "{report}"
    );
    assert_eq!(report["side_info"]["path"], side.path().display().to_string());
    assert_eq!(report["side_info"]["embedding_dim"], side_manifest.embedding_dim);
    assert_eq!(report["active"]["model_id"], active.model_id);

    let human = handid(&addr, operator, &["model", "get"], None).await;
    assert_eq!(status(&human), 0);
    let text = String::from_utf8_lossy(&human.stdout);
    let line = format!(
        "side-info {} cpu from {}",
        side_manifest.model_id,
        side.path().display()
    );
    assert!(text.lines().any(|l| l == line), "no line {line:?} in:\n{text}");

    let _ = stop.send(());
    server.await.expect("server task").expect("clean stop");
}

/// A peer that answers the client's first bytes with `reply` and closes:
/// its address.
async fn impostor(reply: &'static [u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut first = [0u8; 64];
            let _ = socket.read(&mut first).await;
            let _ = socket.write_all(reply).await;
            let _ = socket.shutdown().await;
        }
    });
    format!("http://{addr}")
}

/// A plain-text client at a TLS listener (which answers with an alert) or
/// at something that is no gRPC server gets UNAVAILABLE (exit 24) saying
/// the connection failed and what to check, not UNKNOWN or CANCELLED as if
/// a server had refused the call.
#[tokio::test]
async fn a_peer_that_is_no_grpc_server_is_unavailable_with_a_hint() {
    // TLS 1.2 record: alert, fatal, protocol_version... what a TLS server
    // sends to bytes that are no ClientHello.
    let tls = impostor(b"\x15\x03\x03\x00\x02\x02\x46").await;
    let http1 = impostor(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
    for addr in [&tls, &http1] {
        let out = handid(addr, "key", &["model", "get"], None).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(status(&out), 24, "{addr}: {stderr}");
        assert!(stderr.contains("UNAVAILABLE"), "{stderr}");
        assert!(
            stderr.contains(addr.as_str()) && stderr.contains("https:// address and --tls-ca"),
            "{stderr}"
        );
    }
}

/// A test CA's certificate and a certificate for `localhost` it signed,
/// with its key (PEM).
fn localhost_certificate() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "handid CLI test CA");
    let ca_pem = ca.self_signed(&ca_key).expect("CA").pem();
    let issuer = Issuer::from_params(&ca, &ca_key);
    let key = KeyPair::generate().expect("key");
    let leaf = CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .signed_by(&key, &issuer)
        .expect("sign");
    (ca_pem, leaf.pem(), key.serialize_pem())
}

/// A real TLS listener: the CLI with its CA is served; without it (the
/// certificate is untrusted) or in plain text, it gets UNAVAILABLE (24)
/// naming the certificate problem or the TLS hint.
#[sqlx::test(migrations = false)]
async fn a_tls_listener_refuses_untrusted_and_plain_text_clients_clearly(
    _: PgPoolOptions,
    options: PgConnectOptions,
) {
    let files = tempfile::tempdir().expect("tempdir");
    let (ca, cert, key) = localhost_certificate();
    let write = |name: &str, text: &str| {
        let path = files.path().join(name);
        std::fs::write(&path, text).expect("write pem");
        path
    };
    let ca_file = write("ca.pem", &ca);
    let (_model, mut settings) = model_settings(&options);
    settings.tls.cert_file = Some(write("server.pem", &cert));
    settings.tls.key_file = Some(write("server.key", &key));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(handid_server::run(listener, settings, async {
        let _ = stopped.await;
    }));
    let https = format!("https://localhost:{port}");
    let ca_arg = ca_file.to_str().expect("UTF-8 path");
    let mut ready = false;
    for _ in 0..200 {
        if handid(&https, "", &["--tls-ca", ca_arg, "health"], None)
            .await
            .status
            .success()
        {
            ready = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(ready, "the TLS server never said SERVING to a client with its CA");

    // Without the CA the certificate is untrusted: the reason is named.
    let untrusted = handid(&https, "", &["health"], None).await;
    let stderr = String::from_utf8_lossy(&untrusted.stderr);
    assert_eq!(status(&untrusted), 24, "{stderr}");
    assert!(stderr.contains("certificate"), "{stderr}");
    assert!(stderr.contains("--tls-ca"), "{stderr}");
    // Plain text to the TLS listener.
    let plain = format!("http://127.0.0.1:{port}");
    let out = handid(&plain, "", &["model", "get"], None).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(status(&out), 24, "{stderr}");
    assert!(stderr.contains("https:// address and --tls-ca"), "{stderr}");
    let _ = stop.send(());
    let _ = server.await;
}
