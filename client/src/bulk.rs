//! `enroll --from`: a whole site in one command. The people come from a
//! folder (one subfolder per subject, its image files inside, hidden files
//! skipped) or a CSV file (`subject,image` per line, image paths relative to
//! the file; a first line `subject,image` is a header). Subjects are
//! enrolled `concurrency` at a time, each with an idempotency key derived from the gallery, the subject
//! and the bytes of its images: a run that was interrupted, run again,
//! replays what was already stored instead of enrolling it twice. Transient
//! refusals (UNAVAILABLE, RESOURCE_EXHAUSTED, ABORTED) are retried; every
//! other failure is listed with its reason at the end.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use handid_proto::v1 as pb;
use handid_proto::v1::hand_id_client::HandIdClient;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

/// Tries of a subject whose enrolment is refused for a transient reason.
const ATTEMPTS: u32 = 4;

/// One subject and its image files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Person {
    pub subject: String,
    pub images: Vec<PathBuf>,
}

/// The people of `from`: a folder of subfolders, or a CSV file.
pub fn people(from: &Path) -> anyhow::Result<Vec<Person>> {
    if from.is_dir() {
        from_folder(from)
    } else {
        from_csv(from)
    }
}

fn from_folder(root: &Path) -> anyhow::Result<Vec<Person>> {
    let mut people = Vec::new();
    for entry in std::fs::read_dir(root).with_context(|| format!("reading {}", root.display()))? {
        let path = entry?.path();
        if !path.is_dir() {
            continue;
        }
        let subject = path
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{} is not a UTF-8 name", path.display()))?
            .to_owned();
        let mut images: Vec<PathBuf> = std::fs::read_dir(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            // Hidden files (.DS_Store, editors' droppings) are not photos.
            .filter(|p| {
                p.is_file()
                    && !p
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect();
        images.sort();
        if !images.is_empty() {
            people.push(Person { subject, images });
        }
    }
    people.sort_by(|a, b| a.subject.cmp(&b.subject));
    if people.is_empty() {
        bail!(
            "{} holds no subfolder with images (one per subject)",
            root.display()
        );
    }
    Ok(people)
}

fn from_csv(file: &Path) -> anyhow::Result<Vec<Person>> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let base = file.parent().unwrap_or(Path::new("."));
    let mut by_subject: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || (n == 0 && line.eq_ignore_ascii_case("subject,image")) {
            continue;
        }
        let Some((subject, image)) = line.split_once(',') else {
            bail!(
                "{}:{}: expected `subject,image`, got {line:?}",
                file.display(),
                n + 1
            );
        };
        let (subject, image) = (subject.trim(), image.trim());
        if subject.is_empty() || image.is_empty() {
            bail!(
                "{}:{}: a subject and an image path are both needed",
                file.display(),
                n + 1
            );
        }
        by_subject
            .entry(subject.to_owned())
            .or_default()
            .push(base.join(image));
    }
    if by_subject.is_empty() {
        bail!("{} lists no image", file.display());
    }
    Ok(by_subject
        .into_iter()
        .map(|(subject, images)| Person { subject, images })
        .collect())
}

/// The idempotency key of `subject`'s enrolment from these image bytes.
pub fn idempotency_key(gallery: &str, subject: &str, images: &[Vec<u8>]) -> String {
    let mut hash = Sha256::new();
    for part in [gallery.as_bytes(), subject.as_bytes()] {
        hash.update((part.len() as u64).to_le_bytes());
        hash.update(part);
    }
    for image in images {
        hash.update(Sha256::digest(image));
    }
    let digest = hash.finalize();
    let hex: String = digest.iter().take(20).map(|b| format!("{b:02x}")).collect();
    format!("bulk-{hex}")
}

/// How one subject's enrolment ended.
enum Outcome {
    Stored(u32),
    Replayed,
    Failed {
        code: Option<tonic::Code>,
        reason: String,
    },
}

/// Enrols `people` into `gallery`; returns the JSON summary, its human
/// text and the first failure (input order), if any, as the command's.
pub async fn enroll_all(
    client: HandIdClient<Channel>,
    api_key: Option<&str>,
    gallery: &str,
    people: Vec<Person>,
    concurrency: usize,
) -> (Value, String, Option<crate::Failure>) {
    let progress = indicatif::ProgressBar::new(people.len() as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} subjects {elapsed} (eta {eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let outcomes: Vec<(usize, Outcome)> = futures::stream::iter(people.iter().enumerate())
        .map(|(i, person)| {
            let (client, progress) = (client.clone(), progress.clone());
            async move {
                let outcome = enroll_one(client, api_key, gallery, person).await;
                progress.inc(1);
                (i, outcome)
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    progress.finish_and_clear();
    let mut outcomes = outcomes;
    outcomes.sort_by_key(|(i, _)| *i);
    let (mut stored, mut templates, mut replayed) = (0usize, 0u32, 0usize);
    let mut failures = Vec::new();
    let mut first_failure = None;
    for (i, outcome) in outcomes {
        match outcome {
            Outcome::Stored(n) => (stored, templates) = (stored + 1, templates + n),
            Outcome::Replayed => replayed += 1,
            Outcome::Failed { code, reason } => {
                if first_failure.is_none() {
                    first_failure = Some(match code {
                        Some(code) => crate::Failure::Refused(tonic::Status::new(code, reason.clone())),
                        None => crate::Failure::Local(anyhow::anyhow!("{reason}")),
                    });
                }
                failures.push((people[i].subject.clone(), code, reason));
            }
        }
    }
    let mut text = format!(
        "{gallery}: {stored} subject(s) enrolled ({templates} template(s)), {replayed} already enrolled, {} failed",
        failures.len()
    );
    for (subject, code, reason) in &failures {
        text.push_str(&format!(
            "\n  {subject}: {}{reason}",
            code.map(|c| format!("{}: ", crate::code_name(c)))
                .unwrap_or_default()
        ));
    }
    let value = json!({
        "gallery_id": gallery,
        "enrolled": stored,
        "templates": templates,
        "already_enrolled": replayed,
        "failed": failures.iter().map(|(subject, code, reason)| json!({
            "subject_id": subject,
            "code": code.map(crate::code_name),
            "reason": reason,
        })).collect::<Vec<_>>(),
    });
    (value, text, first_failure)
}

async fn enroll_one(
    mut client: HandIdClient<Channel>,
    api_key: Option<&str>,
    gallery: &str,
    person: &Person,
) -> Outcome {
    let mut images = Vec::with_capacity(person.images.len());
    for path in &person.images {
        match std::fs::read(path) {
            Ok(data) => images.push(data),
            Err(e) => {
                return Outcome::Failed {
                    code: None,
                    reason: format!("reading {}: {e}", path.display()),
                };
            }
        }
    }
    let key = idempotency_key(gallery, &person.subject, &images);
    let message = pb::EnrollRequest {
        gallery_id: gallery.to_owned(),
        subject_id: person.subject.clone(),
        images: images.into_iter().map(|data| pb::Image { data }).collect(),
        idempotency_key: key,
    };
    let (mut wait, mut attempt) = (Duration::from_millis(200), 1);
    loop {
        let Ok(request) = crate::request(api_key, message.clone()) else {
            return Outcome::Failed {
                code: None,
                reason: "the API key holds characters a header cannot carry".to_owned(),
            };
        };
        match client.enroll(request).await {
            Ok(reply) => {
                let reply = reply.into_inner();
                return if reply.replayed {
                    Outcome::Replayed
                } else {
                    Outcome::Stored(u32::try_from(reply.template_ids.len()).unwrap_or(u32::MAX))
                };
            }
            Err(status)
                if attempt < ATTEMPTS
                    && matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::ResourceExhausted | tonic::Code::Aborted
                    ) =>
            {
                tokio::time::sleep(wait).await;
                (wait, attempt) = (wait * 2, attempt + 1);
            }
            Err(status) => {
                return Outcome::Failed {
                    code: Some(status.code()),
                    reason: status.message().to_owned(),
                };
            }
        }
    }
}
