//! TLS material for the control link: a dev-default CA and server certificate generated into
//! `state_dir` with rcgen (the trigger pins `ca.pem`), or the operator's own files.
//! One crypto provider (ring), installed explicitly so a second one pulled in by a dependency
//! can never make rustls panic at start.

use anyhow::{bail, Context, Result};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::Path;
use std::sync::Arc;

/// The name in the dev-default server certificate; `server_name` in trigger.toml.
pub const DEFAULT_SERVER_NAME: &str = "beckon-server";

pub fn install_crypto_provider() {
    // Err means it was installed already (e.g. twice in tests): fine.
    let _ = Arc::unwrap_or_clone(provider()).install_default();
}

/// ring's provider with AES-128-GCM as the first TLS 1.3 suite (ring's own order starts with
/// AES-256-GCM). Why: the assist link carries every byte of an assisted connection, and both
/// ends encrypt or decrypt them all; AES-128 does 10 rounds where AES-256 does 14, and is as
/// good a suite for a link that lives for days. Both configs below are built on it, whatever
/// provider the process has installed.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

/// Create `ca.pem`, `ca.key`, `server.pem`, `server.key` in `state_dir` unless present.
/// Returns (cert chain PEM path, key PEM path).
pub fn ensure_dev_material(state_dir: &Path) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let ca_pem = state_dir.join("ca.pem");
    let ca_key = state_dir.join("ca.key");
    let srv_pem = state_dir.join("server.pem");
    let srv_key = state_dir.join("server.key");
    if ca_pem.exists() && srv_pem.exists() && srv_key.exists() {
        return Ok((srv_pem, srv_key));
    }
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "beckon dev CA");
    ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let ca_keypair = rcgen::KeyPair::generate()?;
    let ca_key_pem = ca_keypair.serialize_pem();
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_keypair)?;

    let mut params = rcgen::CertificateParams::new(vec![DEFAULT_SERVER_NAME.to_string()])?;
    params.distinguished_name.push(rcgen::DnType::CommonName, DEFAULT_SERVER_NAME);
    let key = rcgen::KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca)?;

    write_private(&ca_key, ca_key_pem.as_bytes())?;
    write_private(&srv_key, key.serialize_pem().as_bytes())?;
    std::fs::write(&srv_pem, cert.pem()).with_context(|| format!("writing {}", srv_pem.display()))?;
    std::fs::write(&ca_pem, ca.pem()).with_context(|| format!("writing {}", ca_pem.display()))?;
    tracing::info!(ca = %ca_pem.display(), "generated dev CA and server certificate; triggers pin this ca.pem");
    Ok((srv_pem, srv_key))
}

fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(data)?;
    Ok(())
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let data = std::fs::read(path).with_context(|| format!("reading certificate {}", path.display()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut &data[..])
        .collect::<Result<_, _>>()
        .with_context(|| format!("{}: not a PEM certificate file", path.display()))?;
    if certs.is_empty() {
        bail!("{}: contains no PEM certificate", path.display());
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let data = std::fs::read(path).with_context(|| format!("reading key {}", path.display()))?;
    rustls_pemfile::private_key(&mut &data[..])
        .with_context(|| format!("{}: not a PEM private key", path.display()))?
        .with_context(|| format!("{}: contains no private key", path.display()))
}

pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with the ring provider")?
        .with_no_client_auth()
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .context("server certificate and key do not match")?;
    // The server's suite order (AES-128-GCM first, `provider`) decides, also for older triggers.
    cfg.ignore_client_order = true;
    Ok(Arc::new(cfg))
}

/// Client config that trusts only the pinned CA.
pub fn client_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c).with_context(|| format!("{}: not a usable CA certificate", ca.display()))?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with the ring provider")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

pub fn server_name(name: &str) -> Result<ServerName<'static>> {
    ServerName::try_from(name.to_string()).with_context(|| format!("{name:?} is not a valid TLS server name"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh `state_dir` named `name` with dev material: (dir, cert, key).
    fn dev_dir(name: &str) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
        install_crypto_provider();
        let dir = std::env::temp_dir().join(format!("beckon-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (c, k) = ensure_dev_material(&dir).unwrap();
        (dir, c, k)
    }

    #[test]
    fn dev_material_is_generated_once_and_loads() {
        let (dir, c, k) = dev_dir("tls");
        let first = std::fs::read(&c).unwrap();
        ensure_dev_material(&dir).unwrap();
        assert_eq!(first, std::fs::read(&c).unwrap(), "material must be reused");
        server_config(&c, &k).unwrap();
        client_config(&dir.join("ca.pem")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn links_use_aes_128_gcm() {
        let (dir, c, k) = dev_dir("tls-suite");
        let mut server = rustls::ServerConnection::new(server_config(&c, &k).unwrap()).unwrap();
        let mut client =
            rustls::ClientConnection::new(client_config(&dir.join("ca.pem")).unwrap(), server_name(DEFAULT_SERVER_NAME).unwrap()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        // The handshake in memory: each side's output is the other's input.
        for _ in 0..10 {
            let mut bytes = Vec::new();
            client.write_tls(&mut bytes).unwrap();
            server.read_tls(&mut &bytes[..]).unwrap();
            server.process_new_packets().unwrap();
            bytes.clear();
            server.write_tls(&mut bytes).unwrap();
            client.read_tls(&mut &bytes[..]).unwrap();
            client.process_new_packets().unwrap();
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
        }
        assert!(!client.is_handshaking(), "handshake did not complete");
        let suite = client.negotiated_cipher_suite().unwrap().suite();
        assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        assert_eq!(server.negotiated_cipher_suite().unwrap().suite(), suite);
    }
}
