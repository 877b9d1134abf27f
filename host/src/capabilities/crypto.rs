//! `host:capabilities/crypto`: AES-256-CTR with host-held keys and a host-wide bound on how many
//! encryptions run at once.
//!
//! Key ids are the data key wrapped with AES-256-GCM under the master key:
//! `base64url(nonce[12] || ciphertext[32] || tag[16])`, with the associated data
//! `host:crypto:v1:<app>`, so a key id issued to one app is refused for every other.
//!
//! Every encryption takes a slot of the host-wide bound (`slots.rs`), a chunk at a time for
//! streams, so a slow client never holds a slot while the host waits for its bytes.

use std::path::Path;
use std::sync::Arc;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use anyhow::{Context, Result, bail};
use base64::Engine;
use ctr::cipher::{KeyIvInit, StreamCipher, StreamCipherSeek};

use bytes::{Bytes, BytesMut};
use wasmtime::component::Resource;
use wasmtime_wasi::p2::DynInputStream;

use crate::capabilities::host::capabilities::crypto::{CryptoError, Host};
use crate::capabilities::slots::{Bound, HostWideSlots};
use crate::capabilities::streams::{self, Change, Next, Produced};
use crate::guest::GuestState;

type Aes256Ctr = ctr::Ctr128BE<aes::Aes256>;

const KEY_LENGTH: usize = 32;
const NONCE_LENGTH: usize = 12;
const IV_LENGTH: usize = 16;
const WRAPPING_CONTEXT: &str = "host:crypto:v1:";

/// The crypto capability of one app, shared by its instances.
pub struct Crypto {
    master: Aes256Gcm,
    app: String,
    slots: Option<HostWideSlots>,
}

impl Crypto {
    pub fn new(master_key: &[u8; KEY_LENGTH], app: &str, slots: Option<HostWideSlots>) -> Crypto {
        Crypto {
            master: Aes256Gcm::new(master_key.into()),
            app: app.to_owned(),
            slots,
        }
    }

    fn aad(&self) -> Vec<u8> {
        format!("{WRAPPING_CONTEXT}{}", self.app).into_bytes()
    }

    pub fn generate_key(&self) -> Result<String> {
        let mut key = [0u8; KEY_LENGTH];
        let mut nonce = [0u8; NONCE_LENGTH];
        getrandom::fill(&mut key).context("no randomness for a data key")?;
        getrandom::fill(&mut nonce).context("no randomness for a nonce")?;
        let aad = self.aad();
        let wrapped = self
            .master
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &key,
                    aad: &aad,
                },
            )
            .map_err(|_| anyhow::anyhow!("cannot wrap a data key"))?;
        let mut id = nonce.to_vec();
        id.extend_from_slice(&wrapped);
        Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id))
    }

    pub fn unwrap_key(&self, key_id: &str) -> Option<[u8; KEY_LENGTH]> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(key_id)
            .ok()?;
        if bytes.len() != NONCE_LENGTH + KEY_LENGTH + 16 {
            return None;
        }
        let (nonce, wrapped) = bytes.split_at(NONCE_LENGTH);
        let nonce: [u8; NONCE_LENGTH] = nonce.try_into().ok()?;
        let aad = self.aad();
        let key = self
            .master
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: wrapped,
                    aad: &aad,
                },
            )
            .ok()?;
        key.try_into().ok()
    }

    /// The CTR keystream applied to `data` at `offset`, in a slot of the host-wide bound, off the
    /// async threads.
    pub async fn apply(
        self: &Arc<Self>,
        key_id: &str,
        iv: &[u8],
        offset: u64,
        mut data: Vec<u8>,
    ) -> Result<Result<Vec<u8>, CryptoError>> {
        let Some(key) = self.unwrap_key(key_id) else {
            return Ok(Err(CryptoError::InvalidKey));
        };
        let Ok(iv) = <[u8; IV_LENGTH]>::try_from(iv) else {
            return Ok(Err(CryptoError::InvalidIv));
        };
        let crypto = Arc::clone(self);
        let work = tokio::task::spawn_blocking(move || {
            let _slot = crypto.slots.as_ref().map(|slots| slots.take(Bound::Encryption));
            let mut cipher = Aes256Ctr::new(&key.into(), &iv.into());
            cipher.seek(offset);
            apply_logged(&mut cipher, &mut data);
            data
        });
        Ok(Ok(work.await.context("the encryption task was lost")?))
    }

    /// `source` encrypted (or decrypted) as the bytes at `offset`, as it is read.
    pub fn stream(
        &self,
        key_id: &str,
        iv: &[u8],
        offset: u64,
        source: DynInputStream,
    ) -> Result<DynInputStream, CryptoError> {
        let key = self.unwrap_key(key_id).ok_or(CryptoError::InvalidKey)?;
        let iv = <[u8; IV_LENGTH]>::try_from(iv).map_err(|_| CryptoError::InvalidIv)?;
        let mut cipher = Aes256Ctr::new(&key.into(), &iv.into());
        cipher.seek(offset);
        Ok(Produced::boxed(streams::Map::new(
            source,
            Keystream {
                cipher: Some(cipher),
                slots: self.slots,
            },
        )))
    }
}

/// Applies the keystream to each chunk that passes, in a slot of the host-wide bound: on the
/// async thread when a slot is free at once (a chunk takes microseconds), else on a blocking
/// thread that waits for one.
struct Keystream {
    cipher: Option<Aes256Ctr>,
    slots: Option<HostWideSlots>,
}

impl Change for Keystream {
    async fn chunk(&mut self, bytes: Bytes) -> Next {
        let mut data = bytes
            .try_into_mut()
            .unwrap_or_else(|shared| BytesMut::from(&shared[..]));
        let mut cipher = self
            .cipher
            .take()
            .context("an earlier chunk's encryption was lost")?;
        let slot = match &self.slots {
            Some(slots) => slots.try_take(Bound::Encryption).map(Some),
            None => Some(None),
        };
        let (cipher, data) = match slot {
            Some(_slot) => {
                apply_logged(&mut cipher, &mut data);
                (cipher, data)
            }
            None => {
                let slots = self.slots;
                tokio::task::spawn_blocking(move || {
                    let _slot = slots.map(|slots| slots.take(Bound::Encryption));
                    apply_logged(&mut cipher, &mut data);
                    (cipher, data)
                })
                .await
                .context("the encryption task was lost")?
            }
        };
        self.cipher = Some(cipher);
        Ok(Some(data.freeze()))
    }
}

/// The keystream applied; the monotonic start and end are in the debug log, so the host-wide
/// bound can be checked from outside.
fn apply_logged(cipher: &mut Aes256Ctr, data: &mut [u8]) {
    let started = monotonic_nanos();
    cipher.apply_keystream(data);
    tracing::debug!(
        "crypto: {} bytes from {started} to {} ns (monotonic)",
        data.len(),
        monotonic_nanos()
    );
}

impl Host for GuestState {
    async fn generate_key(&mut self) -> wasmtime::Result<String> {
        // Without randomness the host cannot make keys at all: a trap, not an app error.
        self.crypto()
            .generate_key()
            .map_err(wasmtime::Error::from_anyhow)
    }

    async fn encrypt(
        &mut self,
        key_id: String,
        iv: Vec<u8>,
        offset: u64,
        data: Vec<u8>,
    ) -> wasmtime::Result<Result<Vec<u8>, CryptoError>> {
        self.crypto()
            .apply(&key_id, &iv, offset, data)
            .await
            .map_err(wasmtime::Error::from_anyhow)
    }

    async fn decrypt(
        &mut self,
        key_id: String,
        iv: Vec<u8>,
        offset: u64,
        data: Vec<u8>,
    ) -> wasmtime::Result<Result<Vec<u8>, CryptoError>> {
        self.crypto()
            .apply(&key_id, &iv, offset, data)
            .await
            .map_err(wasmtime::Error::from_anyhow)
    }

    async fn encrypt_stream(
        &mut self,
        key_id: String,
        iv: Vec<u8>,
        offset: u64,
        source: Resource<DynInputStream>,
    ) -> wasmtime::Result<Result<Resource<DynInputStream>, CryptoError>> {
        self.crypto_stream(&key_id, &iv, offset, source)
    }

    async fn decrypt_stream(
        &mut self,
        key_id: String,
        iv: Vec<u8>,
        offset: u64,
        source: Resource<DynInputStream>,
    ) -> wasmtime::Result<Result<Resource<DynInputStream>, CryptoError>> {
        self.crypto_stream(&key_id, &iv, offset, source)
    }
}

impl GuestState {
    fn crypto_stream(
        &mut self,
        key_id: &str,
        iv: &[u8],
        offset: u64,
        source: Resource<DynInputStream>,
    ) -> wasmtime::Result<Result<Resource<DynInputStream>, CryptoError>> {
        let source = self.table().delete(source)?;
        match self.crypto().stream(key_id, iv, offset, source) {
            Ok(stream) => Ok(Ok(self.table().push(stream)?)),
            Err(error) => Ok(Err(error)),
        }
    }
}

fn monotonic_nanos() -> u128 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out pointer for CLOCK_MONOTONIC, which is system-wide on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u128 * 1_000_000_000 + now.tv_nsec as u128
}

/// The crypto capability of the app `settings` serves, in a worker (or a compile step, which
/// has no slots).
pub fn for_app(settings: &crate::settings::Settings) -> Result<Arc<Crypto>> {
    let key = master_key(
        settings.master_key.as_deref(),
        settings.master_key_file.as_deref(),
        &settings.data_dir,
    )?;
    let slots = settings.host_slots.map(HostWideSlots::open);
    Ok(Arc::new(Crypto::new(&key, &settings.app_name(), slots)))
}

/// The master key: `--master-key` (hex, from `HOST_MASTER_KEY`), else `--master-key-file`, else
/// `<data dir>/master.key`, generated on first use with mode 0600.
pub fn master_key(
    hex_key: Option<&str>,
    key_file: Option<&Path>,
    data_dir: &Path,
) -> Result<[u8; KEY_LENGTH]> {
    if let Some(text) = hex_key {
        return parse_key(text.trim().as_bytes())
            .context("HOST_MASTER_KEY must be 64 hex digits (32 bytes)");
    }
    if let Some(path) = key_file {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read the master key {}", path.display()))?;
        return parse_key(&bytes).with_context(|| {
            format!(
                "{} must hold 32 bytes, raw or as 64 hex digits",
                path.display()
            )
        });
    }
    let path = data_dir.join("master.key");
    if let Ok(bytes) = std::fs::read(&path) {
        return parse_key(&bytes)
            .with_context(|| format!("{} is not a master key", path.display()));
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    let mut key = [0u8; KEY_LENGTH];
    getrandom::fill(&mut key).context("no randomness for the master key")?;
    // Written whole under another name, then linked into place only if no other host got there
    // first: nobody ever reads half a key, and two hosts starting at once agree on one.
    use std::io::Write;
    let mut file = tempfile::Builder::new()
        .prefix(".master.key-")
        .tempfile_in(data_dir)
        .with_context(|| format!("cannot create the master key in {}", data_dir.display()))?;
    file.write_all(hex::encode(key).as_bytes())?;
    file.as_file().sync_all()?;
    match file.persist_noclobber(&path) {
        Ok(_) => {
            tracing::info!("generated a master key at {}", path.display());
            Ok(key)
        }
        Err(error) if error.error.kind() == std::io::ErrorKind::AlreadyExists => {
            let bytes = std::fs::read(&path)
                .with_context(|| format!("cannot read the master key {}", path.display()))?;
            parse_key(&bytes).with_context(|| format!("{} is not a master key", path.display()))
        }
        Err(error) => Err(error.error)
            .with_context(|| format!("cannot create the master key {}", path.display())),
    }
}

fn parse_key(bytes: &[u8]) -> Result<[u8; KEY_LENGTH]> {
    let text = String::from_utf8_lossy(bytes);
    let decoded = match hex::decode(text.trim()) {
        Ok(decoded) => decoded,
        Err(_) => bytes.to_vec(),
    };
    match <[u8; KEY_LENGTH]>::try_from(decoded.as_slice()) {
        Ok(key) => Ok(key),
        Err(_) => bail!("expected 32 bytes, found {}", decoded.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole_then_parts(data: &[u8], parts: &[usize]) -> (Vec<u8>, Vec<u8>) {
        let key = [7u8; 32];
        let iv = [0xffu8; 16]; // the counter wraps within the first blocks
        let mut whole = data.to_vec();
        Aes256Ctr::new(&key.into(), &iv.into()).apply_keystream(&mut whole);
        let mut pieces = Vec::new();
        let mut offset = 0;
        for &size in parts {
            let mut part = data[offset..offset + size].to_vec();
            let mut cipher = Aes256Ctr::new(&key.into(), &iv.into());
            cipher.seek(offset as u64);
            cipher.apply_keystream(&mut part);
            pieces.extend(part);
            offset += size;
        }
        (whole, pieces)
    }

    #[test]
    fn parts_of_odd_sizes_equal_the_whole() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let (whole, parts) = whole_then_parts(&data, &[1, 15, 17, 4096, 5000, 871]);
        assert_eq!(whole, parts);
    }

    #[test]
    fn key_ids_belong_to_their_app() {
        let master = [9u8; 32];
        let a = Crypto::new(&master, "a", None);
        let b = Crypto::new(&master, "b", None);
        let id = a.generate_key().unwrap();
        assert!(a.unwrap_key(&id).is_some());
        assert!(b.unwrap_key(&id).is_none());
        let mut tampered = id.clone().into_bytes();
        tampered[20] ^= 1;
        assert!(a.unwrap_key(&String::from_utf8_lossy(&tampered)).is_none());
    }
}
