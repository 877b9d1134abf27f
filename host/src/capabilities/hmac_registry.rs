//! `host:capabilities/hmac-registry`: an HMAC-SHA256 tag over an object's parts, which may
//! arrive in any order, at once, on any worker, and again. The state is in the host's database
//! (`hmac_entries`, `hmac_parts`), keyed by app, so any worker or machine can take any part and
//! a restart loses nothing.
//!
//!     part-mac(n) = HMAC-SHA256(K, u32be(n) || part n)
//!     tag         = HMAC-SHA256(K, "host-hmac-v1" || u32be(count) || Σ u64be(size(n)) || part-mac(n))

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use anyhow::anyhow;
use aws_lc_rs::hmac;
use bytes::Bytes;
use sqlx::Row;
use wasmtime::component::Resource;
use wasmtime_wasi::p2::DynInputStream;

use crate::capabilities::CapabilityView;
use crate::capabilities::crypto::Crypto;
use crate::capabilities::database::{self, HostDatabase};
use crate::capabilities::host::capabilities::hmac_registry::{
    Host, HostPartMac, Part, RegistryError,
};
use crate::capabilities::objects::MAX_PART_NUMBER;
use crate::capabilities::part_buffer::{PartBuffers, PartReader};
use crate::capabilities::streams::{self, Ahead, Change, Next, Produce, Produced};

const TAG_CONTEXT: &[u8] = b"host-hmac-v1";
/// Entry names are the app's own, not object keys, so their bound is the registry's.
const MAX_NAME_LENGTH: usize = 1024;

/// The registry of one app.
pub struct Registry {
    database: Arc<HostDatabase>,
    app: String,
    crypto: Arc<Crypto>,
    buffers: Arc<PartBuffers>,
}

/// The MAC of a part as its bytes pass through a tap.
pub struct PartMac {
    number: u32,
    state: Arc<Mutex<Tapped>>,
}

struct Tapped {
    mac: Option<hmac::Context>,
    size: u64,
    /// Set when the source ended: the MAC covers the whole part.
    digest: Option<[u8; 32]>,
}

type RegistryResult<T> = Result<T, RegistryError>;

impl From<sqlx::Error> for RegistryError {
    fn from(error: sqlx::Error) -> RegistryError {
        RegistryError::Unavailable(format!("the registry's database failed: {error}"))
    }
}

/// A recorded part, with its MAC.
struct Recorded {
    number: u32,
    size: u64,
    mac: Vec<u8>,
    etag: String,
}

impl Registry {
    pub fn new(
        database: Arc<HostDatabase>,
        app: &str,
        crypto: Arc<Crypto>,
        buffers: Arc<PartBuffers>,
    ) -> Registry {
        Registry {
            database,
            app: app.to_owned(),
            crypto,
            buffers,
        }
    }

    fn check_name(name: &str) -> RegistryResult<()> {
        if name.is_empty() || name.len() > MAX_NAME_LENGTH {
            return Err(RegistryError::InvalidName);
        }
        Ok(())
    }

    fn mac_for(&self, key_id: &str) -> RegistryResult<hmac::Key> {
        let key = self
            .crypto
            .unwrap_key(key_id)
            .ok_or(RegistryError::InvalidKey)?;
        Ok(hmac::Key::new(hmac::HMAC_SHA256, &key))
    }

    /// The entry's key id and tag.
    async fn entry(&self, name: &str) -> RegistryResult<(String, Option<String>)> {
        Self::check_name(name)?;
        let pool = self.database.pool().await?;
        self.entry_in(pool, name, false).await
    }

    /// The entry's key id and tag, read with `executor`; with `lock`, its row stays locked for
    /// the rest of the transaction `executor` is in.
    async fn entry_in<'e>(
        &self,
        executor: impl sqlx::Executor<'e, Database = sqlx::Any>,
        name: &str,
        lock: bool,
    ) -> RegistryResult<(String, Option<String>)> {
        let lock_rows = if lock { self.database.lock_rows() } else { "" };
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT key_id, tag FROM hmac_entries WHERE app = $1 AND name = $2{lock_rows}"
        )))
        .bind(&self.app)
        .bind(name)
        .fetch_optional(executor)
        .await?
        .ok_or(RegistryError::UnknownEntry)?;
        Ok((row.try_get(0)?, row.try_get(1)?))
    }

    async fn recorded(&self, name: &str) -> RegistryResult<Vec<Recorded>> {
        let pool = self.database.pool().await?;
        self.recorded_in(pool, name).await
    }

    /// The entry's recorded parts in order, read with `executor`.
    async fn recorded_in<'e>(
        &self,
        executor: impl sqlx::Executor<'e, Database = sqlx::Any>,
        name: &str,
    ) -> RegistryResult<Vec<Recorded>> {
        let rows = sqlx::query(
            "SELECT number, size, mac, etag FROM hmac_parts WHERE app = $1 AND name = $2 ORDER BY number",
        )
        .bind(&self.app)
        .bind(name)
        .fetch_all(executor)
        .await?;
        rows.iter().map(recorded_from).collect()
    }

    pub async fn begin(&self, name: &str, key_id: &str) -> RegistryResult<()> {
        Self::check_name(name)?;
        self.mac_for(key_id)?;
        let pool = self.database.pool().await?;
        sqlx::query(
            "INSERT INTO hmac_entries (app, name, key_id, touched) VALUES ($1, $2, $3, $4) ON CONFLICT (app, name) DO NOTHING",
        )
        .bind(&self.app)
        .bind(name)
        .bind(key_id)
        .bind(unix_seconds(SystemTime::now()))
        .execute(pool)
        .await?;
        let (existing, _) = self.entry(name).await?;
        if existing != key_id {
            return Err(RegistryError::EntryExists);
        }
        Ok(())
    }

    pub async fn tap(
        &self,
        name: &str,
        number: u32,
        source: DynInputStream,
    ) -> RegistryResult<(DynInputStream, PartMac)> {
        check_number(number)?;
        let (key_id, tag) = self.entry(name).await?;
        if tag.is_some() {
            return Err(RegistryError::Finished);
        }
        let mut mac = hmac::Context::with_key(&self.mac_for(&key_id)?);
        mac.update(&number.to_be_bytes());
        let state = Arc::new(Mutex::new(Tapped {
            mac: Some(mac),
            size: 0,
            digest: None,
        }));
        let stream = Produced::boxed(Ahead::new(streams::Map::new(
            source,
            Tap {
                state: Arc::clone(&state),
            },
        )));
        Ok((stream, PartMac { number, state }))
    }

    /// Records part `number` with its MAC, unless the entry is finished.
    async fn record(
        &self,
        name: &str,
        number: u32,
        size: u64,
        mac: &[u8],
        etag: &str,
    ) -> RegistryResult<Part> {
        Self::check_name(name)?;
        let mut transaction = self.database.begin_write().await?;
        let (_, tag) = self.entry_in(&mut *transaction, name, true).await?;
        if tag.is_some() {
            return Err(RegistryError::Finished);
        }
        sqlx::query(
            "INSERT INTO hmac_parts (app, name, number, size, mac, etag) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (app, name, number) DO UPDATE SET size = excluded.size, mac = excluded.mac, etag = excluded.etag",
        )
        .bind(&self.app)
        .bind(name)
        .bind(i64::from(number))
        .bind(size as i64)
        .bind(mac.to_vec())
        .bind(etag)
        .execute(&mut *transaction)
        .await?;
        sqlx::query("UPDATE hmac_entries SET touched = $3 WHERE app = $1 AND name = $2")
            .bind(&self.app)
            .bind(name)
            .bind(unix_seconds(SystemTime::now()))
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        Ok(Part {
            number,
            size,
            etag: etag.to_owned(),
        })
    }

    pub async fn add_tapped(
        &self,
        name: &str,
        tapped: PartMac,
        etag: &str,
    ) -> RegistryResult<Part> {
        let (digest, size) = {
            let state = tapped
                .state
                .lock()
                .map_err(|_| RegistryError::IncompletePart)?;
            (
                state.digest.ok_or(RegistryError::IncompletePart)?,
                state.size,
            )
        };
        self.record(name, tapped.number, size, &digest, etag).await
    }

    pub async fn add_bytes(
        &self,
        name: &str,
        number: u32,
        data: &[u8],
        etag: &str,
    ) -> RegistryResult<Part> {
        check_number(number)?;
        let (key_id, _) = self.entry(name).await?;
        let mut mac = hmac::Context::with_key(&self.mac_for(&key_id)?);
        mac.update(&number.to_be_bytes());
        mac.update(data);
        let digest = mac.sign();
        self.record(name, number, data.len() as u64, digest.as_ref(), etag)
            .await
    }

    pub async fn parts(&self, name: &str) -> RegistryResult<Vec<Part>> {
        self.entry(name).await?;
        Ok(self
            .recorded(name)
            .await?
            .into_iter()
            .map(|part| Part {
                number: part.number,
                size: part.size,
                etag: part.etag,
            })
            .collect())
    }

    pub async fn finish(&self, name: &str, stored: &[Part]) -> RegistryResult<String> {
        Self::check_name(name)?;
        let stored = stored_parts(stored)?;
        let mut transaction = self.database.begin_write().await?;
        let (key_id, tag) = self.entry_in(&mut *transaction, name, true).await?;
        if let Some(tag) = tag {
            return Ok(tag);
        }
        let highest = stored.keys().next_back().copied().unwrap_or(0);
        // Within 1..=MAX_PART_NUMBER (checked above), so this walks at most 10,000 numbers.
        let missing: Vec<u32> = (1..=highest)
            .filter(|number| !stored.contains_key(number))
            .collect();
        if highest == 0 || !missing.is_empty() {
            return Err(RegistryError::MissingParts(if highest == 0 {
                vec![1]
            } else {
                missing
            }));
        }
        let recorded = self.recorded_in(&mut *transaction, name).await?;
        let recorded_by_number: std::collections::BTreeMap<u32, &Recorded> =
            recorded.iter().map(|part| (part.number, part)).collect();
        let mismatched: Vec<u32> = stored
            .values()
            .filter(|part| {
                !recorded_by_number
                    .get(&part.number)
                    .is_some_and(|r| r.size == part.size && r.etag == part.etag)
            })
            .map(|part| part.number)
            .chain(
                recorded
                    .iter()
                    .filter(|r| r.number > highest)
                    .map(|r| r.number),
            )
            .collect();
        if !mismatched.is_empty() {
            return Err(RegistryError::MismatchedParts(mismatched));
        }
        let tag = hex::encode(object_tag(&self.mac_for(&key_id)?, &recorded));
        sqlx::query("UPDATE hmac_entries SET tag = $1 WHERE app = $2 AND name = $3")
            .bind(&tag)
            .bind(&self.app)
            .bind(name)
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        Ok(tag)
    }

    pub async fn tag(&self, name: &str) -> RegistryResult<String> {
        self.entry(name).await?.1.ok_or(RegistryError::Unfinished)
    }

    pub async fn verify_stream(
        &self,
        name: &str,
        first: u32,
        source: DynInputStream,
        skip: u64,
        take: u64,
    ) -> RegistryResult<DynInputStream> {
        let (key_id, tag) = self.entry(name).await?;
        let tag = tag.ok_or(RegistryError::Unfinished)?;
        let recorded = self.recorded(name).await?;
        let mac = self.mac_for(&key_id)?;
        // The parts' MACs must still make the tag, or the records themselves were changed.
        if hex::encode(object_tag(&mac, &recorded)) != tag {
            tracing::error!("hmac registry: the recorded parts of {name:?} no longer make its tag");
            return Err(RegistryError::Tampered(0));
        }
        let parts: Vec<Recorded> = recorded
            .into_iter()
            .filter(|part| part.number >= first)
            .collect();
        if parts.first().map(|part| part.number) != Some(first) {
            return Err(RegistryError::InvalidPartNumber);
        }
        let mut verify = Verify {
            source,
            parts: parts.into_iter(),
            mac,
            name: name.to_owned(),
            position: 0,
            skip,
            end: skip.saturating_add(take),
            current: PartReader::empty(),
            buffers: Arc::clone(&self.buffers),
        };
        // The first part is checked now, so a bad one is an answer, not a cut stream.
        match verify.load_next_part().await {
            Ok(()) => Ok(Produced::boxed(verify)),
            Err(VerifyFailure::Tampered(number)) => Err(RegistryError::Tampered(number)),
            Err(VerifyFailure::Other(error)) => {
                Err(RegistryError::Unavailable(format!("{error:#}")))
            }
        }
    }

    pub async fn discard(&self, name: &str) -> RegistryResult<()> {
        Self::check_name(name)?;
        let mut transaction = self.database.begin_write().await?;
        for table in ["hmac_parts", "hmac_entries"] {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM {table} WHERE app = $1 AND name = $2"
            )))
            .bind(&self.app)
            .bind(name)
            .execute(&mut *transaction)
            .await?;
        }
        transaction.commit().await?;
        Ok(())
    }
}

impl Registry {
    /// Discards the unfinished entries not begun nor given a part since `cutoff` (those of
    /// abandoned uploads); returns how many. Entries made before entries had a time count from
    /// the first time this runs.
    pub async fn discard_idle(&self, cutoff: SystemTime) -> RegistryResult<usize> {
        let pool = self.database.pool().await?;
        sqlx::query("UPDATE hmac_entries SET touched = $2 WHERE app = $1 AND touched IS NULL")
            .bind(&self.app)
            .bind(unix_seconds(SystemTime::now()))
            .execute(pool)
            .await?;
        let idle: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM hmac_entries WHERE app = $1 AND tag IS NULL AND touched < $2",
        )
        .bind(&self.app)
        .bind(unix_seconds(cutoff))
        .fetch_all(pool)
        .await?;
        for name in &idle {
            self.discard(name).await?;
        }
        Ok(idle.len())
    }
}

/// Seconds since the Unix epoch (0 before it).
pub(crate) fn unix_seconds(time: SystemTime) -> i64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs() as i64)
}

/// The stored parts the guest names, by number: each number within S3's 1..=10000 and named
/// once, so what `finish` does is bounded by the parts that can exist, not by a number the
/// guest chose.
fn stored_parts(stored: &[Part]) -> RegistryResult<std::collections::BTreeMap<u32, &Part>> {
    let mut by_number = std::collections::BTreeMap::new();
    for part in stored {
        check_number(part.number)?;
        if by_number.insert(part.number, part).is_some() {
            return Err(RegistryError::InvalidPartNumber);
        }
    }
    Ok(by_number)
}

fn check_number(number: u32) -> RegistryResult<()> {
    if (1..=MAX_PART_NUMBER).contains(&number) {
        Ok(())
    } else {
        Err(RegistryError::InvalidPartNumber)
    }
}

fn recorded_from(row: &database::Row) -> RegistryResult<Recorded> {
    let number: i64 = row.try_get(0)?;
    let size: i64 = row.try_get(1)?;
    Ok(Recorded {
        number: u32::try_from(number).map_err(|_| RegistryError::InvalidPartNumber)?,
        size: size as u64,
        mac: row.try_get(2)?,
        etag: row.try_get(3)?,
    })
}

/// The object's tag from its parts' MACs, in order.
fn object_tag(key: &hmac::Key, parts: &[Recorded]) -> hmac::Tag {
    let mut mac = hmac::Context::with_key(key);
    mac.update(TAG_CONTEXT);
    mac.update(&(parts.len() as u32).to_be_bytes());
    for part in parts {
        mac.update(&part.size.to_be_bytes());
        mac.update(&part.mac);
    }
    mac.sign()
}

/// Feeds each chunk to the part's MAC on its way through.
struct Tap {
    state: Arc<Mutex<Tapped>>,
}

impl Change for Tap {
    async fn chunk(&mut self, bytes: Bytes) -> Next {
        let mut state = self
            .state
            .lock()
            .map_err(|_| anyhow!("the part's MAC was lost"))?;
        state.size += bytes.len() as u64;
        if let Some(mac) = state.mac.as_mut() {
            mac.update(&bytes);
        }
        Ok(Some(bytes))
    }

    fn end(&mut self) {
        if let Ok(mut state) = self.state.lock()
            && let Some(mac) = state.mac.take()
            && let Ok(digest) = <[u8; 32]>::try_from(mac.sign().as_ref())
        {
            state.digest = Some(digest);
        }
    }
}

enum VerifyFailure {
    Tampered(u32),
    Other(anyhow::Error),
}

/// Reads the object's parts whole, one at a time, checks each against its MAC, and passes on
/// the verified bytes in `skip..end` (counted from the start of the first part).
struct Verify {
    source: DynInputStream,
    parts: std::vec::IntoIter<Recorded>,
    mac: hmac::Key,
    name: String,
    /// Where in the source the current part ends.
    position: u64,
    skip: u64,
    end: u64,
    /// The current part's verified bytes still to pass on, in its part buffer.
    current: PartReader,
    buffers: Arc<PartBuffers>,
}

impl Verify {
    /// Called with the previous part's buffer gone (see `next`), so a verifier holds one part
    /// buffer at a time.
    async fn load_next_part(&mut self) -> Result<(), VerifyFailure> {
        let Some(part) = self.parts.next() else {
            return Ok(());
        };
        let start = self.position;
        self.position += part.size;
        let mut mac = hmac::Context::with_key(&self.mac);
        mac.update(&part.number.to_be_bytes());
        let mut buffer = self
            .buffers
            .buffer(part.size)
            .map_err(VerifyFailure::Other)?;
        let mut read = 0u64;
        while read < part.size {
            let want = (part.size - read).min(streams::CHUNK as u64) as usize;
            let next = buffer
                .wait_for(streams::read_chunk(&mut self.source, want))
                .await
                .map_err(VerifyFailure::Other)?;
            match next {
                Ok(Some(bytes)) => {
                    let bytes = if bytes.len() > want {
                        bytes.slice(..want)
                    } else {
                        bytes
                    };
                    read += bytes.len() as u64;
                    mac.update(&bytes);
                    buffer.write(&bytes).await.map_err(VerifyFailure::Other)?;
                }
                Ok(None) => {
                    return Err(VerifyFailure::Other(anyhow!(
                        "the stored object ends inside part {} of {:?}",
                        part.number,
                        self.name
                    )));
                }
                Err(error) => return Err(VerifyFailure::Other(error)),
            }
        }
        if aws_lc_rs::constant_time::verify_slices_are_equal(mac.sign().as_ref(), &part.mac)
            .is_err()
        {
            tracing::error!(
                "hmac registry: part {} of {:?} does not match its MAC: the stored bytes were changed",
                part.number,
                self.name
            );
            return Err(VerifyFailure::Tampered(part.number));
        }
        let from = self.skip.max(start).min(self.position) - start;
        let to = self.end.max(start).min(self.position) - start;
        // A part wholly before the range was read (to check it) but none of it is kept.
        self.current = buffer
            .finish()
            .await
            .map_err(VerifyFailure::Other)?
            .reader(from, to);
        Ok(())
    }
}

impl Produce for Verify {
    async fn next(mut self) -> (Self, Next) {
        loop {
            match self.current.next_chunk().await {
                Ok(Some(chunk)) => return (self, Ok(Some(chunk))),
                // The part is passed on: its buffer (a part file, say) goes, and its slot with it.
                Ok(None) => self.current = PartReader::empty(),
                Err(error) => return (self, Err(error)),
            }
            if self.position >= self.end || self.parts.len() == 0 {
                return (self, Ok(None));
            }
            match self.load_next_part().await {
                Ok(()) => {}
                Err(VerifyFailure::Tampered(number)) => {
                    let name = self.name.clone();
                    return (
                        self,
                        Err(anyhow!(
                            "part {number} of {name:?} failed verification: the stored bytes were changed"
                        )),
                    );
                }
                Err(VerifyFailure::Other(error)) => return (self, Err(error)),
            }
        }
    }
}

impl HostPartMac for CapabilityView<'_> {
    async fn number(&mut self, mac: Resource<PartMac>) -> wasmtime::Result<u32> {
        Ok(self.table.get(&mac)?.number)
    }

    async fn size(&mut self, mac: Resource<PartMac>) -> wasmtime::Result<u64> {
        let state = self.table.get(&mac)?.state.clone();
        let size = state.lock().map(|state| state.size).unwrap_or(0);
        Ok(size)
    }

    async fn drop(&mut self, mac: Resource<PartMac>) -> wasmtime::Result<()> {
        self.table.delete(mac)?;
        Ok(())
    }
}

impl Host for CapabilityView<'_> {
    async fn begin(
        &mut self,
        name: String,
        key_id: String,
    ) -> wasmtime::Result<RegistryResult<()>> {
        Ok(self.app.registry.begin(&name, &key_id).await)
    }

    async fn tap(
        &mut self,
        name: String,
        number: u32,
        source: Resource<DynInputStream>,
    ) -> wasmtime::Result<RegistryResult<(Resource<DynInputStream>, Resource<PartMac>)>> {
        let source = self.table.delete(source)?;
        let tapped = self.app.registry.tap(&name, number, source).await;
        Ok(match tapped {
            Ok((stream, mac)) => Ok((self.push_stream(stream)?, self.table.push(mac)?)),
            Err(error) => Err(error),
        })
    }

    async fn add_part(
        &mut self,
        name: String,
        mac: Resource<PartMac>,
        etag: String,
    ) -> wasmtime::Result<RegistryResult<Part>> {
        let mac = self.table.delete(mac)?;
        Ok(self.app.registry.add_tapped(&name, mac, &etag).await)
    }

    async fn add_part_bytes(
        &mut self,
        name: String,
        number: u32,
        data: Vec<u8>,
        etag: String,
    ) -> wasmtime::Result<RegistryResult<Part>> {
        Ok(self
            .app
            .registry
            .add_bytes(&name, number, &data, &etag)
            .await)
    }

    async fn parts(&mut self, name: String) -> wasmtime::Result<RegistryResult<Vec<Part>>> {
        Ok(self.app.registry.parts(&name).await)
    }

    async fn finish(
        &mut self,
        name: String,
        stored: Vec<Part>,
    ) -> wasmtime::Result<RegistryResult<String>> {
        Ok(self.app.registry.finish(&name, &stored).await)
    }

    async fn tag(&mut self, name: String) -> wasmtime::Result<RegistryResult<String>> {
        Ok(self.app.registry.tag(&name).await)
    }

    async fn verify_stream(
        &mut self,
        name: String,
        first: u32,
        source: Resource<DynInputStream>,
        skip: u64,
        take: u64,
    ) -> wasmtime::Result<RegistryResult<Resource<DynInputStream>>> {
        let source = self.table.delete(source)?;
        let verified = self
            .app
            .registry
            .verify_stream(&name, first, source, skip, take)
            .await;
        Ok(match verified {
            Ok(stream) => Ok(self.push_stream(stream)?),
            Err(error) => Err(error),
        })
    }

    async fn discard(&mut self, name: String) -> wasmtime::Result<RegistryResult<()>> {
        Ok(self.app.registry.discard(&name).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented construction, computed here by hand from the parts.
    #[test]
    fn the_tag_is_the_documented_construction() {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &[3u8; 32]);
        let parts: [&[u8]; 3] = [b"first part", b"second", b"3"];
        let recorded: Vec<Recorded> = parts
            .iter()
            .enumerate()
            .map(|(index, bytes)| {
                let number = index as u32 + 1;
                let message = [&number.to_be_bytes()[..], bytes].concat();
                Recorded {
                    number,
                    size: bytes.len() as u64,
                    mac: hmac::sign(&key, &message).as_ref().to_vec(),
                    etag: String::new(),
                }
            })
            .collect();
        let tag = object_tag(&key, &recorded);
        let mut message = b"host-hmac-v1".to_vec();
        message.extend(3u32.to_be_bytes());
        for part in &recorded {
            message.extend(part.size.to_be_bytes());
            message.extend(&part.mac);
        }
        assert_eq!(tag.as_ref(), hmac::sign(&key, &message).as_ref());
    }
}
