//! Resource-record module (patent S5): sites, each trigger's public endpoint as the server saw
//! it, and the cameras each trigger reported. Persisted as `state_dir/registry.json`, written
//! atomically (temp file, fsync, rename, fsync of the directory) so a crash never leaves half a file.

use crate::wire::control::CameraReport;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

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
        Ok(RegistryStore { path, registry })
    }

    pub fn save(&self) -> Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        let data = serde_json::to_vec_pretty(&self.registry)?;
        {
            let mut f = std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
            f.write_all(&data)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path).with_context(|| format!("renaming to {}", self.path.display()))?;
        if let Some(dir) = self.path.parent() {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    pub fn record_registration(&mut self, site: &str, public: String) -> Result<()> {
        let rec = self.registry.sites.entry(site.to_string()).or_default();
        rec.trigger_public = Some(public);
        rec.last_registered_unix = Some(unix_now());
        self.save()
    }

    pub fn record_report(&mut self, site: &str, cameras: Vec<CameraReport>) -> Result<()> {
        self.registry.sites.entry(site.to_string()).or_default().cameras = cameras;
        self.save()
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
        s.record_registration("site-a", "203.0.113.2:40000".into()).unwrap();
        s.record_report(
            "site-a",
            vec![CameraReport {
                name: "cam1".into(),
                ip: "198.18.1.10".parse().unwrap(),
                device_type: "gb28181".into(),
                services: vec!["udp/5060".parse().unwrap()],
            }],
        )
        .unwrap();
        let again = RegistryStore::open(&dir).unwrap();
        assert_eq!(again.registry, s.registry);
        assert!(again.registry.camera("site-a", "cam1").is_some());
        std::fs::write(dir.join("registry.json"), b"{half").unwrap();
        let e = RegistryStore::open(&dir).err().unwrap().to_string();
        assert!(e.contains("corrupt registry"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
