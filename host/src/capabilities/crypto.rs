//! `host:capabilities/crypto`: AES-256-CTR with host-held keys and a host-wide bound on how many
//! encryptions run at once.
//!
//! Key ids are the data key wrapped with AES-256-GCM under the master key:
//! `base64url(nonce[12] || ciphertext[32] || tag[16])`, with the associated data
//! `host:crypto:v1:<app>`, so a key id issued to one app is refused for every other.
//!
//! Every encryption takes a slot of the host-wide bound (`host_semaphores.rs`), a chunk at a time for
//! streams, so a slow client never holds a slot while the host waits for its bytes; and first a
//! place in its app's share of those slots in the worker (a fair queue), so one app's many
//! streams cannot keep every slot from another app.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::cipher::{AES_256, EncryptingKey, EncryptionContext, UnboundCipherKey};
use aws_lc_rs::iv::FixedLength;
use base64::Engine;
use bytes::{Bytes, BytesMut};
use wasmtime::component::Resource;
use wasmtime_wasi::p2::DynInputStream;

use crate::capabilities::host::capabilities::crypto::{CryptoError, Host};
use crate::capabilities::host_semaphores::{self, Bound, HostSemaphores};
use crate::capabilities::streams::{self, Ahead, CHUNK, Change, Next, Produced};
use crate::capabilities::{CapabilityView, chunk_pool};

const KEY_LENGTH: usize = 32;
const NONCE_LENGTH: usize = 12;
const TAG_LENGTH: usize = 16;
const IV_LENGTH: usize = 16;
const BLOCK: u64 = 16;
const WRAPPING_CONTEXT: &str = "host:crypto:v1:";

/// The crypto capability of one app, shared by its instances.
pub struct Crypto {
    master: LessSafeKey,
    /// `host:crypto:v1:<app>`, the associated data of this app's wrapped keys.
    wrapping_aad: Vec<u8>,
    /// The app's name, in the debug log of each encryption.
    app: Arc<str>,
    slots: Option<HostSemaphores>,
    /// The app's share of the encryption slots in this worker.
    share: Arc<tokio::sync::Semaphore>,
}

/// Whether `length` bytes at `offset` end before offset 2^64, where the offsets (and so the
/// keystream) would start again.
pub fn in_range(offset: u64, length: usize) -> bool {
    u64::try_from(length).is_ok_and(|length| offset.checked_add(length).is_some())
}

/// AES-256-CTR of one object: the keystream at any offset, without state, so parts and chunks
/// are encrypted on their own.
pub struct Keystream {
    key: EncryptingKey,
    iv: u128,
}

impl Keystream {
    pub fn new(key: &[u8; KEY_LENGTH], iv: &[u8; IV_LENGTH]) -> Result<Keystream> {
        let key =
            UnboundCipherKey::new(&AES_256, key).map_err(|_| anyhow!("not an AES-256 key"))?;
        Ok(Keystream {
            key: EncryptingKey::ctr(key).map_err(|_| anyhow!("cannot make an AES-CTR key"))?,
            iv: u128::from_be_bytes(*iv),
        })
    }

    /// XORs `data`, the bytes at `offset` of the object, with the keystream. The bytes must end
    /// before offset 2^64 (`in_range`).
    pub fn apply(&self, offset: u64, data: &mut [u8]) -> Result<()> {
        if !in_range(offset, data.len()) {
            bail!(
                "{} bytes at offset {offset} run past offset 2^64",
                data.len()
            );
        }
        let mut block = offset / BLOCK;
        let skip = (offset % BLOCK) as usize;
        let mut rest = data;
        if skip != 0 {
            // The first bytes sit inside a block: encrypt that block's worth and keep its tail.
            let take = (BLOCK as usize - skip).min(rest.len());
            let mut partial = [0u8; BLOCK as usize];
            partial[skip..skip + take].copy_from_slice(&rest[..take]);
            self.blocks(block, &mut partial)?;
            rest[..take].copy_from_slice(&partial[skip..skip + take]);
            rest = &mut rest[take..];
            block += 1;
        }
        if rest.is_empty() {
            return Ok(());
        }
        self.blocks(block, rest)
    }

    /// CTR from counter block `iv + block` (128-bit, big-endian, wrapping).
    fn blocks(&self, block: u64, data: &mut [u8]) -> Result<()> {
        let counter = self.iv.wrapping_add(u128::from(block)).to_be_bytes();
        self.key
            .less_safe_encrypt(data, EncryptionContext::Iv128(FixedLength::from(counter)))
            .map(drop)
            .map_err(|_| anyhow!("AES-CTR failed"))
    }
}

impl Crypto {
    /// The crypto of `app`, which may run `share` encryptions at once in this worker.
    pub fn new(
        master_key: &[u8; KEY_LENGTH],
        app: &str,
        slots: Option<HostSemaphores>,
        share: u32,
    ) -> Crypto {
        let master =
            UnboundKey::new(&AES_256_GCM, master_key).expect("a 32-byte key is an AES-256-GCM key");
        Crypto {
            master: LessSafeKey::new(master),
            wrapping_aad: format!("{WRAPPING_CONTEXT}{app}").into_bytes(),
            app: Arc::from(app),
            slots,
            share: Arc::new(tokio::sync::Semaphore::new(share.max(1) as usize)),
        }
    }

    fn aad(&self) -> Aad<&[u8]> {
        Aad::from(self.wrapping_aad.as_slice())
    }

    pub fn generate_key(&self) -> Result<String> {
        let mut key = [0u8; KEY_LENGTH];
        let mut nonce = [0u8; NONCE_LENGTH];
        getrandom::fill(&mut key).context("no randomness for a data key")?;
        getrandom::fill(&mut nonce).context("no randomness for a nonce")?;
        let mut wrapped = key.to_vec();
        self.master
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                self.aad(),
                &mut wrapped,
            )
            .map_err(|_| anyhow!("cannot wrap a data key"))?;
        let mut id = nonce.to_vec();
        id.extend_from_slice(&wrapped);
        Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id))
    }

    pub fn unwrap_key(&self, key_id: &str) -> Option<[u8; KEY_LENGTH]> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(key_id)
            .ok()?;
        if bytes.len() != NONCE_LENGTH + KEY_LENGTH + TAG_LENGTH {
            return None;
        }
        let (nonce, wrapped) = bytes.split_at(NONCE_LENGTH);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut wrapped = wrapped.to_vec();
        let key = self
            .master
            .open_in_place(nonce, self.aad(), &mut wrapped)
            .ok()?;
        <[u8; KEY_LENGTH]>::try_from(&key[..]).ok()
    }

    fn keystream(&self, key_id: &str, iv: &[u8]) -> Result<Result<Keystream, CryptoError>> {
        let Some(key) = self.unwrap_key(key_id) else {
            return Ok(Err(CryptoError::InvalidKey));
        };
        let Ok(iv) = <[u8; IV_LENGTH]>::try_from(iv) else {
            return Ok(Err(CryptoError::InvalidIv));
        };
        Ok(Ok(Keystream::new(&key, &iv)?))
    }

    /// The CTR keystream applied to `data` at `offset`, in a slot of the host-wide bound, off the
    /// async threads. The slot is waited for on the async thread, so waiters hold no blocking
    /// thread.
    pub async fn apply(
        &self,
        key_id: &str,
        iv: &[u8],
        offset: u64,
        mut data: Vec<u8>,
    ) -> Result<Result<Vec<u8>, CryptoError>> {
        let keystream = match self.keystream(key_id, iv)? {
            Ok(keystream) => keystream,
            Err(error) => return Ok(Err(error)),
        };
        if !in_range(offset, data.len()) {
            return Ok(Err(CryptoError::OutOfRange));
        }
        let share = take_share(&self.share).await;
        let slot = host_semaphores::take_if_bounded(self.slots, Bound::Encryption).await;
        let app = Arc::clone(&self.app);
        let work = tokio::task::spawn_blocking(move || {
            let _slots = (share, slot);
            apply_logged(&app, &keystream, offset, &mut data).map(|()| data)
        });
        Ok(Ok(work.await.context("the encryption task was lost")??))
    }

    /// `source` encrypted (or decrypted) as the bytes at `offset`, as it is read. The next
    /// chunk is encrypted while the reader uses this one (a MAC, say), on another thread.
    pub fn stream(
        &self,
        key_id: &str,
        iv: &[u8],
        offset: u64,
        source: DynInputStream,
    ) -> Result<Result<DynInputStream, CryptoError>> {
        let keystream = match self.keystream(key_id, iv)? {
            Ok(keystream) => keystream,
            Err(error) => return Ok(Err(error)),
        };
        Ok(Ok(Produced::boxed(Ahead::new(streams::Map::new(
            source,
            Encrypting {
                app: Arc::clone(&self.app),
                keystream,
                offset,
                slots: self.slots,
                share: Arc::clone(&self.share),
            },
        )))))
    }
}

/// Applies the keystream to each chunk that passes, in a slot of the host-wide bound (a chunk
/// takes microseconds, so it is done on the async thread once the slot is taken).
struct Encrypting {
    app: Arc<str>,
    keystream: Keystream,
    offset: u64,
    slots: Option<HostSemaphores>,
    share: Arc<tokio::sync::Semaphore>,
}

/// A place in the app's share of the encryption slots (the semaphore is never closed).
async fn take_share(
    share: &Arc<tokio::sync::Semaphore>,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    Arc::clone(share).acquire_owned().await.ok()
}

impl Change for Encrypting {
    async fn chunk(&mut self, bytes: Bytes) -> Next {
        // Encrypted in place if this stage holds the only reference, else into a reused chunk:
        // the source's buffer (a request body's, say) is given back at once.
        match bytes.try_into_mut() {
            Ok(mut unique) => {
                self.apply(&mut unique).await?;
                Ok(Some(unique.freeze()))
            }
            Err(shared) if shared.len() <= CHUNK => {
                let mut chunk = chunk_pool::take().context("no memory to encrypt into")?;
                chunk.append(&shared);
                drop(shared);
                self.apply(chunk.as_mut()).await?;
                Ok(Some(chunk.freeze()))
            }
            Err(shared) => {
                let mut copy = BytesMut::from(&shared[..]);
                drop(shared);
                self.apply(&mut copy).await?;
                Ok(Some(copy.freeze()))
            }
        }
    }
}

impl Encrypting {
    /// Applies the keystream to the next bytes of the stream, in a slot of the bound.
    async fn apply(&mut self, data: &mut [u8]) -> Result<()> {
        let _share = take_share(&self.share).await;
        let _slot = host_semaphores::take_if_bounded(self.slots, Bound::Encryption).await;
        // Fails the stream for bytes past offset 2^64, before the offset could wrap.
        apply_logged(&self.app, &self.keystream, self.offset, data)?;
        self.offset += data.len() as u64;
        Ok(())
    }
}

/// The keystream applied; the monotonic start and end are in the debug log, so the host-wide
/// bound can be checked from outside.
fn apply_logged(app: &str, keystream: &Keystream, offset: u64, data: &mut [u8]) -> Result<()> {
    let started = crate::clock::since_start().as_nanos();
    keystream.apply(offset, data)?;
    tracing::debug!(
        "crypto: app {app}: {} bytes from {started} to {} ns (monotonic)",
        data.len(),
        crate::clock::since_start().as_nanos()
    );
    Ok(())
}

impl Host for CapabilityView<'_> {
    async fn generate_key(&mut self) -> wasmtime::Result<String> {
        // Without randomness the host cannot make keys at all: a trap, not an app error.
        self.app
            .crypto
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
        self.app
            .crypto
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
        self.app
            .crypto
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

impl CapabilityView<'_> {
    fn crypto_stream(
        &mut self,
        key_id: &str,
        iv: &[u8],
        offset: u64,
        source: Resource<DynInputStream>,
    ) -> wasmtime::Result<Result<Resource<DynInputStream>, CryptoError>> {
        let source = self.table.delete(source)?;
        match self
            .app
            .crypto
            .stream(key_id, iv, offset, source)
            .map_err(wasmtime::Error::from_anyhow)?
        {
            Ok(stream) => Ok(Ok(self.push_stream(stream)?)),
            Err(error) => Ok(Err(error)),
        }
    }
}

/// The crypto capability of `app` in a worker, under the master key and within the host-wide
/// semaphores (none where the host has no bounds).
pub fn for_app(
    settings: &crate::settings::Settings,
    master_key: &[u8; KEY_LENGTH],
    semaphores: Option<HostSemaphores>,
    app: &str,
) -> Arc<Crypto> {
    let apps = settings.apps.len().max(1) as u32;
    let share = settings.encrypt_concurrency / apps;
    Arc::new(Crypto::new(master_key, app, semaphores, share))
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
            .context("--master-key (HOST_MASTER_KEY) must be 64 hex digits (32 bytes)");
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
    crate::private_fs::create_dir_all(data_dir).context("the data directory")?;
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

    #[test]
    fn parts_of_odd_sizes_equal_the_whole_even_where_the_counter_wraps() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 31 % 251) as u8).collect();
        // The counter wraps within the first blocks.
        let keystream = Keystream::new(&[7u8; 32], &[0xff; 16]).unwrap();
        let mut whole = data.clone();
        keystream.apply(0, &mut whole).unwrap();
        let mut parts = Vec::new();
        let mut offset = 0;
        for size in [1, 15, 17, 4096, 5000, 871] {
            let mut part = data[offset..offset + size].to_vec();
            keystream.apply(offset as u64, &mut part).unwrap();
            parts.extend(part);
            offset += size;
        }
        assert_eq!(whole, parts);
        // Applying it again gives the plaintext back.
        keystream.apply(0, &mut whole).unwrap();
        assert_eq!(whole, data);
    }

    #[test]
    fn key_ids_belong_to_their_app() {
        let master = [9u8; 32];
        let a = Crypto::new(&master, "a", None, 1);
        let b = Crypto::new(&master, "b", None, 1);
        let id = a.generate_key().unwrap();
        assert!(a.unwrap_key(&id).is_some());
        assert!(b.unwrap_key(&id).is_none());
        let mut tampered = id.clone().into_bytes();
        tampered[20] ^= 1;
        assert!(a.unwrap_key(&String::from_utf8_lossy(&tampered)).is_none());
    }
}
