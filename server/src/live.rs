//! Settings that change while the server runs: the `auth` section (API keys
//! and certificate grants), read again from the settings file by
//! ReloadSettings and on SIGHUP and applied at once, whole or not at all.
//!
//! Every other setting is read at start only; a reload lists those whose
//! value in the file differs from the running one
//! ([`SettingsReloaded::restart_required`]), so an operator learns that an
//! edit waits for a restart instead of assuming it took effect.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use crate::auth::Authenticator;
use crate::settings::{AuthSettings, Settings};

/// The authenticator in force; a settings reload replaces it whole, so a
/// call is checked against one set of grants, the old or the new.
#[derive(Debug)]
pub struct LiveAuth(RwLock<Arc<Authenticator>>);

impl LiveAuth {
    /// Starts with the grants of `settings`.
    pub fn new(settings: &AuthSettings) -> Self {
        Self(RwLock::new(Arc::new(Authenticator::new(settings))))
    }

    /// The grants in force now.
    pub fn current(&self) -> Arc<Authenticator> {
        Arc::clone(&self.0.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn replace(&self, next: Authenticator) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(next);
    }
}

/// What a settings reload applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SettingsReloaded {
    /// The file read.
    pub path: PathBuf,
    /// API keys now in force.
    pub keys: usize,
    /// Certificate grants now in force.
    pub certificate_grants: usize,
    /// Key and grant ids that are new.
    pub added: Vec<String>,
    /// Key and grant ids that are gone.
    pub removed: Vec<String>,
    /// Ids kept with another hash, scopes or galleries, and `auth.enabled`
    /// when a reload turned it on.
    pub changed: Vec<String>,
    /// Settings whose value in the file differs from the running one and
    /// that apply at the next start.
    pub restart_required: Vec<String>,
}

/// Why a settings reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum SettingsReloadError {
    /// The server was started from defaults and `HANDID__*` variables only.
    #[error("the server was started without a settings file (serve --config): there is nothing to reload")]
    NoFile,
    /// The file does not read, parse or validate.
    #[error("the settings file {path} is refused, the running keys stay in force: {source}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        source: crate::settings::SettingsError,
    },
    /// The file turns access control off while it is on.
    #[error(
        "the settings file {path} sets auth.enabled: false, refused while the server runs (it would \
         open every method to every caller at once), the running keys stay in force: auth can only \
         be turned off by a restart with the new file"
    )]
    AuthDisabled {
        /// The file.
        path: PathBuf,
    },
}

/// The settings file and the settings in force.
#[derive(Debug)]
pub struct LiveSettings {
    file: Option<PathBuf>,
    running: Mutex<Settings>,
    auth: Arc<LiveAuth>,
}

impl LiveSettings {
    /// `settings` as the server started with them (read from
    /// `settings.file`, when set), and the authenticator built from them.
    pub fn new(settings: &Settings, auth: Arc<LiveAuth>) -> Self {
        Self {
            file: settings.file.clone(),
            running: Mutex::new(settings.clone()),
            auth,
        }
    }

    /// Whether the settings came from a file (ReloadSettings has one to
    /// read).
    pub fn has_file(&self) -> bool {
        self.file.is_some()
    }

    /// The authenticator the protection layers consult.
    pub fn auth(&self) -> &Arc<LiveAuth> {
        &self.auth
    }

    /// Reads the settings file again (with the `HANDID__*` variables, as at
    /// start) and applies its `auth` section. Blocking (a small file read).
    ///
    /// A file that turns `auth.enabled` off while it is on is refused whole
    /// (a reload is the quick, routine path, which should never open the
    /// server to everyone); a restart with that file does it. Turning auth
    /// on is applied like any other change.
    pub fn reload(&self) -> Result<SettingsReloaded, SettingsReloadError> {
        let path = self.file.clone().ok_or(SettingsReloadError::NoFile)?;
        // The file is read under the lock: two reloads overlapping an edit
        // (a SIGHUP and a ReloadSettings) then apply in the order they read
        // the file, so the last applied is the newest text. Read before the
        // lock, the older text could be applied last and bring back a key
        // the edit had removed.
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        let next = Settings::load(Some(&path)).map_err(|source| SettingsReloadError::Invalid {
            path: path.clone(),
            source,
        })?;
        if running.auth.enabled && !next.auth.enabled {
            return Err(SettingsReloadError::AuthDisabled { path });
        }
        let mut reloaded = grant_changes(&running.auth, &next.auth);
        reloaded.path = path;
        reloaded.restart_required = restart_required(&running, &next);
        self.auth.replace(Authenticator::new(&next.auth));
        running.auth = next.auth;
        Ok(reloaded)
    }
}

/// The grants of `auth` by id: keys by their id, certificate grants by
/// their subject or san, each with what it holds (as JSON, for comparing).
fn grants(auth: &AuthSettings) -> BTreeMap<String, serde_json::Value> {
    let keys = auth
        .keys
        .iter()
        .map(|k| (k.id.clone(), serde_json::to_value(k).unwrap_or_default()));
    let certificates = auth
        .certificates
        .iter()
        .map(|c| (c.id(), serde_json::to_value(c).unwrap_or_default()));
    keys.chain(certificates).collect()
}

/// Counts and the ids added, removed and changed from `old` to `new`.
fn grant_changes(old: &AuthSettings, new: &AuthSettings) -> SettingsReloaded {
    let (before, after) = (grants(old), grants(new));
    let mut changed: Vec<String> = after
        .iter()
        .filter(|(id, grant)| before.get(*id).is_some_and(|b| b != *grant))
        .map(|(id, _)| id.clone())
        .collect();
    if old.enabled != new.enabled {
        changed.insert(0, "auth.enabled".to_owned());
    }
    SettingsReloaded {
        keys: new.keys.len(),
        certificate_grants: new.certificates.len(),
        added: after
            .keys()
            .filter(|id| !before.contains_key(*id))
            .cloned()
            .collect(),
        removed: before
            .keys()
            .filter(|id| !after.contains_key(*id))
            .cloned()
            .collect(),
        changed,
        ..SettingsReloaded::default()
    }
}

/// The dotted keys outside `auth` whose values differ between `running`
/// and `next`. `model.adopt` is left out: it decides a start, and the
/// command line may have set it.
fn restart_required(running: &Settings, next: &Settings) -> Vec<String> {
    fn walk(prefix: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                for key in keys {
                    let name = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    let null = serde_json::Value::Null;
                    walk(
                        &name,
                        a.get(key).unwrap_or(&null),
                        b.get(key).unwrap_or(&null),
                        out,
                    );
                }
            }
            (a, b) if a != b => out.push(prefix.to_owned()),
            _ => {}
        }
    }
    let as_json = |s: &Settings| serde_json::to_value(s).unwrap_or_default();
    let mut out = Vec::new();
    walk("", &as_json(running), &as_json(next), &mut out);
    out.retain(|key| !key.starts_with("auth.") && key != "auth" && key != "model.adopt");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "a665a45920422f9d417e4867efdc4fb8a04a1f3fff1fa07e998e86f7f7a27ae3";
    const KEY_B: &str = "b3a8e0e1f9ab1bfe3a36f231f676f78bb30a519d2b21e6c530c0eee8ebb4a5d0";

    fn settings(yaml: &str) -> Settings {
        Settings::from_yaml_and_env(yaml, Vec::new()).expect("settings")
    }

    #[test]
    fn grant_changes_name_what_was_added_removed_and_changed() {
        let old = settings(&format!(
            "auth:\n  keys:\n    - {{id: door, sha256: {KEY_A}, scopes: [identify]}}\n    \
             - {{id: desk, sha256: {KEY_B}, scopes: [enroll]}}\n"
        ));
        let new = settings(&format!(
            "auth:\n  enabled: false\n  keys:\n    - {{id: door, sha256: {KEY_A}, scopes: [identify, embed]}}\n    \
             - {{id: ops, sha256: {KEY_B}, scopes: [admin]}}\n  certificates:\n    \
             - {{san: 'dns:door-7.example', scopes: [identify]}}\n"
        ));
        let changes = grant_changes(&old.auth, &new.auth);
        assert_eq!(changes.keys, 2);
        assert_eq!(changes.certificate_grants, 1);
        assert_eq!(changes.added, ["dns:door-7.example", "ops"]);
        assert_eq!(changes.removed, ["desk"]);
        assert_eq!(changes.changed, ["auth.enabled", "door"]);
    }

    #[test]
    fn restart_required_lists_changed_settings_outside_auth() {
        let running = settings("limits:\n  max_image_bytes: 1000000\n");
        let mut next = settings(&format!(
            "limits:\n  max_image_bytes: 2000000\nbatch:\n  max_wait_ms: 9\nauth:\n  keys:\n    \
             - {{id: door, sha256: {KEY_A}, scopes: [identify]}}\n"
        ));
        next.model.adopt = true;
        assert_eq!(
            restart_required(&running, &next),
            ["batch.max_wait_ms", "limits.max_image_bytes"]
        );
        assert!(restart_required(&running, &running.clone()).is_empty());
    }

    #[test]
    fn a_reload_replaces_the_grants_whole_or_not_at_all() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("server.yaml");
        let write = |text: &str| std::fs::write(&file, text).expect("write settings");
        write(&format!(
            "auth:\n  keys:\n    - {{id: door, sha256: {KEY_A}, scopes: [identify]}}\n"
        ));
        let mut started = Settings::load(Some(&file)).expect("settings");
        assert_eq!(started.file.as_deref(), Some(file.as_path()));
        let live = LiveSettings::new(&started, Arc::new(LiveAuth::new(&started.auth)));
        let before = live.auth().current();

        // A file that does not validate: refused, the same grants in force.
        write("auth:\n  keys:\n    - {id: door, sha256: nothex, scopes: [identify]}\n");
        let refused = live.reload().expect_err("invalid file");
        assert!(refused.to_string().contains("server.yaml"), "{refused}");
        assert!(Arc::ptr_eq(&before, &live.auth().current()));

        write(&format!(
            "auth:\n  keys:\n    - {{id: ops, sha256: {KEY_B}, scopes: [admin]}}\n"
        ));
        let applied = live.reload().expect("valid file");
        assert_eq!(applied.added, ["ops"]);
        assert_eq!(applied.removed, ["door"]);
        assert!(!Arc::ptr_eq(&before, &live.auth().current()));

        started.file = None;
        let fileless = LiveSettings::new(&started, Arc::new(LiveAuth::new(&started.auth)));
        assert!(matches!(fileless.reload(), Err(SettingsReloadError::NoFile)));
    }

    /// Whether `key` may call Identify under the grants in force.
    fn identifies(live: &LiveSettings, key: Option<&str>) -> bool {
        let mut headers = http::HeaderMap::new();
        if let Some(key) = key {
            headers.insert(
                crate::auth::AUTHORIZATION,
                format!("Bearer {key}").parse().expect("header"),
            );
        }
        live.auth()
            .current()
            .check("/handid.v1.HandId/Identify", &headers, &http::Extensions::new())
            .is_ok()
    }

    #[test]
    fn a_reload_may_turn_auth_on_but_never_off() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("server.yaml");
        let write = |text: &str| std::fs::write(&file, text).expect("write settings");
        let door = |enabled: bool| {
            format!(
                "auth:\n  enabled: {enabled}\n  keys:\n    - {{id: door, sha256: {}, scopes: [identify]}}\n",
                crate::auth::hash_key("door-key")
            )
        };
        write(&door(true));
        let started = Settings::load(Some(&file)).expect("settings");
        let live = LiveSettings::new(&started, Arc::new(LiveAuth::new(&started.auth)));
        let before = live.auth().current();
        assert!(identifies(&live, Some("door-key")) && !identifies(&live, None));

        // Off by a reload: refused whole, auth stays on with the same keys.
        write(&door(false));
        let refused = live.reload().expect_err("auth turned off by a reload");
        assert!(
            matches!(refused, SettingsReloadError::AuthDisabled { .. }),
            "{refused}"
        );
        let message = refused.to_string();
        assert!(
            message.contains("server.yaml")
                && message.contains("auth.enabled: false")
                && message.contains("restart"),
            "{message}"
        );
        assert!(Arc::ptr_eq(&before, &live.auth().current()));
        assert!(identifies(&live, Some("door-key")) && !identifies(&live, None));
        assert!(live.running.lock().expect("running").auth.enabled);

        // Started with auth off (a restart with that file), a reload turns
        // it on.
        let started = Settings::load(Some(&file)).expect("settings");
        let live = LiveSettings::new(&started, Arc::new(LiveAuth::new(&started.auth)));
        assert!(identifies(&live, None));
        write(&door(true));
        let applied = live.reload().expect("auth turned on");
        assert_eq!(applied.changed, ["auth.enabled"]);
        assert!(identifies(&live, Some("door-key")) && !identifies(&live, None));
    }

    #[test]
    fn a_reload_applies_the_file_as_it_is_once_it_holds_the_running_settings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("server.yaml");
        let write = |text: &str| std::fs::write(&file, text).expect("write settings");
        write(&format!(
            "auth:\n  keys:\n    - {{id: door, sha256: {KEY_A}, scopes: [identify]}}\n"
        ));
        let started = Settings::load(Some(&file)).expect("settings");
        let live = Arc::new(LiveSettings::new(
            &started,
            Arc::new(LiveAuth::new(&started.auth)),
        ));
        // Another reload holds the running settings while this one starts;
        // the file is edited (the door key revoked) before it lets go. Were
        // the file read before the lock, the revoked key would come back
        // once this reload applied what it read.
        let other = live.running.lock().expect("running");
        let reloading = {
            let live = Arc::clone(&live);
            std::thread::spawn(move || live.reload())
        };
        std::thread::sleep(std::time::Duration::from_millis(300));
        write(&format!(
            "auth:\n  keys:\n    - {{id: ops, sha256: {KEY_B}, scopes: [admin]}}\n"
        ));
        drop(other);
        let applied = reloading.join().expect("reload thread").expect("valid file");
        assert_eq!(applied.added, ["ops"]);
        assert_eq!(applied.removed, ["door"]);
    }
}
