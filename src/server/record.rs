//! Resource-record module (patent S5): sites, each trigger's public endpoint as the server saw
//! it, and the cameras each trigger reported. Persisted as `state_dir/registry.json`, written
//! atomically (temp file, fsync, rename, fsync of the directory) so a crash never leaves half a file.

use crate::wire::control::CameraReport;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SiteRecord {
    /// Public (post-NAT) endpoint of the trigger's control link, last seen.
    pub trigger_public: Option<String>,
    /// Unix time of the last successful registration.
    pub last_registered_unix: Option<u64>,
    pub cameras: Vec<CameraReport>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Registry {
    pub sites: BTreeMap<String, SiteRecord>,
}

impl Registry {
    pub fn camera(&self, site: &str, name: &str) -> Option<&CameraReport> {
        self.sites.get(site)?.cameras.iter().find(|c| c.name == name)
    }
}

/// The registry plus where it lives on disk.
pub struct RegistryStore {
    path: PathBuf,
    pub registry: Registry,
    /// Changes made so far; the last one written to disk (shared with every [`Unsaved`]).
    changes: u64,
    written: Arc<Mutex<u64>>,
}

/// A change of the registry, still to be written to disk, outside the registry's lock. Why: a
/// write ends with fsyncs (milliseconds, more on a busy disk), and the TUN thread looks
/// cameras up under that lock for new UDP clients, as new TCP clients do: every registration
/// or report held the data path of every site for that long.
#[must_use = "a change is only on disk once saved"]
pub struct Unsaved {
    change: u64,
    data: Vec<u8>,
    path: PathBuf,
    written: Arc<Mutex<u64>>,
}

impl Unsaved {
    /// Write the registry as it was at this change, unless a later change is on disk already
    /// (changes saved from different tasks can come in either order).
    pub fn save(self) -> Result<()> {
        let mut written = self.written.lock().unwrap();
        if *written >= self.change {
            return Ok(());
        }
        write_atomically(&self.path, &self.data)?;
        *written = self.change;
        Ok(())
    }
}

/// Write `data` to `path` so that a crash leaves the old file or the new one, never half of one:
/// a temporary file, fsync, rename, fsync of the directory.
fn write_atomically(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

impl RegistryStore {
    /// Load `state_dir/registry.json`, or start empty if it does not exist. A corrupt file is an
    /// error (never silently overwritten: it may be the only copy of an installation's sites).
    pub fn open(state_dir: &Path) -> Result<Self> {
        let path = state_dir.join("registry.json");
        let registry = match std::fs::read(&path) {
            Ok(data) => serde_json::from_slice(&data).with_context(|| {
                format!("{}: corrupt registry ({}); move it aside to start with an empty one", path.display(), "invalid JSON")
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Registry::default(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(RegistryStore { path, registry, changes: 0, written: Arc::new(Mutex::new(0)) })
    }

    /// The registry as it is now, to be written by [`Unsaved::save`].
    fn changed(&mut self) -> Unsaved {
        self.changes += 1;
        // (Serialising a registry cannot fail: string keys, plain data.)
        let data = serde_json::to_vec_pretty(&self.registry).unwrap_or_default();
        Unsaved { change: self.changes, data, path: self.path.clone(), written: self.written.clone() }
    }

    pub fn record_registration(&mut self, site: &str, public: String) -> Unsaved {
        let rec = self.registry.sites.entry(site.to_string()).or_default();
        rec.trigger_public = Some(public);
        rec.last_registered_unix = Some(unix_now());
        self.changed()
    }

    /// `None` if the site's recorded cameras are exactly these (nothing to write).
    pub fn record_report(&mut self, site: &str, cameras: Vec<CameraReport>) -> Option<Unsaved> {
        let rec = self.registry.sites.entry(site.to_string()).or_default();
        if rec.cameras == cameras {
            return None;
        }
        rec.cameras = cameras;
        Some(self.changed())
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reopen_and_refuses_corruption() {
        let dir = std::env::temp_dir().join(format!("beckon-reg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = RegistryStore::open(&dir).unwrap();
        s.record_registration("site-a", "203.0.113.2:40000".into()).save().unwrap();
        let cameras = vec![CameraReport {
            name: "cam1".into(),
            ip: "198.18.1.10".parse().unwrap(),
            device_type: "gb28181".into(),
            services: vec!["udp/5060".parse().unwrap()],
        }];
        s.record_report("site-a", cameras.clone()).expect("a new report is a change").save().unwrap();
        assert!(s.record_report("site-a", cameras).is_none(), "the same report again is no change");
        let again = RegistryStore::open(&dir).unwrap();
        assert_eq!(again.registry, s.registry);
        assert!(again.registry.camera("site-a", "cam1").is_some());
        std::fs::write(dir.join("registry.json"), b"{half").unwrap();
        let e = RegistryStore::open(&dir).err().unwrap().to_string();
        assert!(e.contains("corrupt registry"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Changes saved out of order: the later one stays on disk.
    #[test]
    fn an_older_change_never_overwrites_a_newer_one() {
        let dir = std::env::temp_dir().join(format!("beckon-reg-order-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = RegistryStore::open(&dir).unwrap();
        let first = s.record_registration("site-a", "203.0.113.2:1".into());
        let second = s.record_registration("site-a", "203.0.113.2:2".into());
        second.save().unwrap();
        first.save().unwrap();
        let on_disk = RegistryStore::open(&dir).unwrap();
        assert_eq!(on_disk.registry.sites["site-a"].trigger_public.as_deref(), Some("203.0.113.2:2"));
        // In order, both are written.
        let third = s.record_registration("site-a", "203.0.113.2:3".into());
        third.save().unwrap();
        assert_eq!(RegistryStore::open(&dir).unwrap().registry.sites["site-a"].trigger_public.as_deref(), Some("203.0.113.2:3"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
