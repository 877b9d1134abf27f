//! HTTPS on the listeners (`--certfile`, `--keyfile`, `--ca-certs`, `--cert-reqs`): rustls with
//! aws-lc-rs, as the host's outbound calls. HTTP/1.1 only, as the listeners serve.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use crate::settings::{ClientCerts, TlsFiles};

/// The server side of TLS for `files`, read now: every problem (a missing file, a key that does
/// not match the certificate) is told with the file and the flag.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.certfile)
        .and_then(|certificates| certificates.collect())
        .with_context(|| format!("--certfile {}", files.certfile.display()))?;
    if chain.is_empty() {
        bail!(
            "--certfile {}: no certificate in it",
            files.certfile.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(&files.keyfile)
        .with_context(|| format!("--keyfile {}: no private key", files.keyfile.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .context("cannot set up TLS")?;
    let builder = match (&files.ca_certs, files.client_certs) {
        (Some(ca_certs), wanted) if wanted != ClientCerts::None => {
            let mut roots = rustls::RootCertStore::empty();
            for certificate in CertificateDer::pem_file_iter(ca_certs)
                .with_context(|| format!("--ca-certs {}", ca_certs.display()))?
            {
                let certificate =
                    certificate.with_context(|| format!("--ca-certs {}", ca_certs.display()))?;
                roots
                    .add(certificate)
                    .with_context(|| format!("--ca-certs {}", ca_certs.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = match wanted {
                ClientCerts::Optional => verifier.allow_unauthenticated(),
                _ => verifier,
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .with_context(|| format!("--ca-certs {}", ca_certs.display()))?,
            )
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).with_context(|| {
        format!(
            "--certfile {} and --keyfile {} do not make a certificate and its key",
            files.certfile.display(),
            files.keyfile.display()
        )
    })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
