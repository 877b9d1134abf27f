//! The S3 object store, through aws-sdk-s3, configured as the seed configured boto3 for Wasabi:
//! any endpoint, region and addressing style, adaptive retries (3 attempts), 10 s to connect,
//! 60 s to read, and at most 50 requests in flight per worker (so at most 50 connections).
//!
//! Each app's keys live under `<prefix><app>/`. A part is buffered whole (a part buffer:
//! `part_buffer.rs`) so that a retry can send it again; it is read from its source to the end
//! before the request to S3 begins.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Result;
use aws_config::BehaviorVersion;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{Region, RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime_wasi::p2::DynInputStream;

use super::{Exact, ObjectResult, S3Settings};
use crate::capabilities::host::capabilities::objects::{ObjectError, ObjectInfo, PartInfo};
use crate::capabilities::part_buffer::{PartBuffers, Whole};
use crate::capabilities::streams::{Next, Produce, Produced};

const MAX_ATTEMPTS: u32 = 3;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const READ_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_REQUESTS_IN_FLIGHT: usize = 50;
const DEFAULT_REGION: &str = "us-east-1";

pub struct S3Store {
    client: Client,
    bucket: String,
    /// `<prefix><app>/`: every key of the app is under it.
    app_prefix: String,
    in_flight: Arc<Semaphore>,
    /// Seals the upload ids the guest gets (see `seal`).
    upload_ids: aws_lc_rs::hmac::Key,
    buffers: Arc<PartBuffers>,
}

/// What the guest is told when S3 fails: the service's code and message, or why no answer came.
/// Only an outage or an answer the host does not expect is a warning: "no such upload" or "no
/// such key" answer a question (an abort checks that nothing is left), and go to the guest.
fn failure<E>(what: &str, error: SdkError<E>) -> ObjectError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let failure = answer(what, &error);
    match &failure {
        ObjectError::Unavailable(_) => tracing::warn!("S3 {what} failed: {}", chain(&error)),
        _ => tracing::debug!("S3 {what}: {}", chain(&error)),
    }
    failure
}

fn answer<E>(what: &str, error: &SdkError<E>) -> ObjectError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match error {
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or("unknown");
            match code {
                "NoSuchUpload" => ObjectError::NoSuchUpload,
                "NoSuchKey" | "NotFound" => ObjectError::NotFound,
                "InvalidRange" => ObjectError::InvalidRange,
                "EntityTooSmall" | "InvalidPart" | "InvalidPartOrder" => {
                    ObjectError::InvalidPart(service.err().message().unwrap_or(code).to_owned())
                }
                _ => ObjectError::Unavailable(format!(
                    "S3 {what} failed: {code}: {}",
                    service.err().message().unwrap_or("no message")
                )),
            }
        }
        _ => ObjectError::Unavailable(format!(
            "S3 {what} failed after {MAX_ATTEMPTS} attempts: {}",
            chain(error)
        )),
    }
}

/// An error and its causes on one line (the SDK's own display adds the raw response).
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl S3Store {
    pub async fn new(
        location: &super::S3Location,
        settings: &S3Settings,
        app: &str,
        master_key: &[u8; 32],
        buffers: Arc<PartBuffers>,
    ) -> Result<S3Store> {
        // The region is never looked up from instance metadata, which costs seconds off EC2.
        let region = settings
            .region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok())
            .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
            .unwrap_or_else(|| DEFAULT_REGION.to_owned());
        let shared = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(region))
            .retry_config(RetryConfig::adaptive().with_max_attempts(MAX_ATTEMPTS))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .read_timeout(READ_TIMEOUT)
                    .build(),
            )
            .load()
            .await;
        let mut config = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(settings.path_style)
            // Plain SigV4 payloads, as boto3 sends to Wasabi: no streaming trailers that
            // other S3 implementations may not take.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if let Some(endpoint) = &settings.endpoint {
            config = config.endpoint_url(endpoint);
        }
        // A key of its own, derived from the master key.
        let upload_ids = aws_lc_rs::hmac::Key::new(
            aws_lc_rs::hmac::HMAC_SHA256,
            aws_lc_rs::hmac::sign(
                &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, master_key),
                b"host:objects:v1:upload-id",
            )
            .as_ref(),
        );
        Ok(S3Store {
            client: Client::from_conf(config.build()),
            bucket: location.bucket.clone(),
            app_prefix: format!("{}{app}/", location.prefix),
            in_flight: Arc::new(Semaphore::new(MAX_REQUESTS_IN_FLIGHT)),
            upload_ids,
            buffers,
        })
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.app_prefix)
    }

    /// The guest's upload id: S3's, sealed to the app and the key, so that no guest can use an
    /// upload id with another key or another app's, even on an S3 API that does not check.
    fn seal(&self, key: &str, s3_upload_id: &str) -> String {
        format!("{s3_upload_id}.{}", self.upload_seal(key, s3_upload_id))
    }

    fn upload_seal(&self, key: &str, s3_upload_id: &str) -> String {
        let mut mac = aws_lc_rs::hmac::Context::with_key(&self.upload_ids);
        mac.update(self.full_key(key).as_bytes());
        mac.update(&[0]);
        mac.update(s3_upload_id.as_bytes());
        hex::encode(&mac.sign().as_ref()[..16])
    }

    /// S3's upload id inside a sealed one, if the seal is this app's for this key.
    fn unseal<'a>(&self, key: &str, upload_id: &'a str) -> ObjectResult<&'a str> {
        let (s3_upload_id, seal) = upload_id
            .rsplit_once('.')
            .ok_or(ObjectError::NoSuchUpload)?;
        let expected = self.upload_seal(key, s3_upload_id);
        if aws_lc_rs::constant_time::verify_slices_are_equal(seal.as_bytes(), expected.as_bytes())
            .is_ok()
        {
            Ok(s3_upload_id)
        } else {
            Err(ObjectError::NoSuchUpload)
        }
    }

    async fn permit(&self) -> OwnedSemaphorePermit {
        match Arc::clone(&self.in_flight).acquire_owned().await {
            Ok(permit) => permit,
            // The semaphore is never closed.
            Err(_) => unreachable!("the S3 request semaphore is never closed"),
        }
    }

    pub async fn create_multipart(&self, key: &str) -> ObjectResult<String> {
        let _permit = self.permit().await;
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
            .map_err(|e| failure("create multipart upload", e))?;
        created
            .upload_id()
            .map(|id| self.seal(key, id))
            .ok_or_else(|| ObjectError::Unavailable("S3 gave no upload id".to_owned()))
    }

    pub async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u32,
        mut source: DynInputStream,
        length: u64,
    ) -> ObjectResult<PartInfo> {
        let upload_id = self.unseal(key, upload_id)?;
        let unavailable = |e: anyhow::Error| ObjectError::Unavailable(format!("{e:#}"));
        let mut buffer = self.buffers.whole_buffer(length).map_err(unavailable)?;
        let mut bytes = Exact::new(&mut source, length);
        while let Some(chunk) = buffer.wait_for(bytes.next()).await.map_err(unavailable)?? {
            buffer.write(&chunk).await.map_err(unavailable)?;
        }
        let filled = buffer.finish().await.map_err(unavailable)?;
        let body = match filled.whole() {
            Whole::Memory(bytes) => ByteStream::from(bytes),
            Whole::File(path) => ByteStream::from_path(path)
                .await
                .map_err(|e| ObjectError::Unavailable(format!("cannot read the part file: {e}")))?,
        };
        let _permit = self.permit().await;
        let uploaded = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .upload_id(upload_id)
            .part_number(number as i32)
            .content_length(length as i64)
            .body(body)
            .send()
            .await
            .map_err(|e| failure("upload part", e))?;
        Ok(PartInfo {
            number,
            size: length,
            etag: uploaded.e_tag().unwrap_or_default().to_owned(),
        })
    }

    pub async fn list_parts(&self, key: &str, upload_id: &str) -> ObjectResult<Vec<PartInfo>> {
        let mut parts: Vec<PartInfo> = self
            .stored_parts(key, upload_id)
            .await?
            .iter()
            .map(|part| PartInfo {
                number: part.part_number().unwrap_or_default() as u32,
                size: part.size().unwrap_or_default() as u64,
                etag: part.e_tag().unwrap_or_default().to_owned(),
            })
            .collect();
        parts.sort_by_key(|part| part.number);
        Ok(parts)
    }

    /// S3's description of the upload's parts, every page of it.
    async fn stored_parts(
        &self,
        key: &str,
        upload_id: &str,
    ) -> ObjectResult<Vec<aws_sdk_s3::types::Part>> {
        let upload_id = self.unseal(key, upload_id)?;
        let _permit = self.permit().await;
        let mut parts = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let page = self
                .client
                .list_parts()
                .bucket(&self.bucket)
                .key(self.full_key(key))
                .upload_id(upload_id)
                .set_part_number_marker(marker.clone())
                .send()
                .await
                .map_err(|e| failure("list parts", e))?;
            parts.extend(page.parts().iter().cloned());
            match (page.is_truncated(), page.next_part_number_marker()) {
                (Some(true), Some(next)) => marker = Some(next.to_owned()),
                _ => break,
            }
        }
        Ok(parts)
    }

    pub async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[PartInfo],
    ) -> ObjectResult<ObjectInfo> {
        let s3_upload_id = self.unseal(key, upload_id)?;
        let completed = CompletedMultipartUpload::builder()
            .set_parts(Some(
                parts
                    .iter()
                    .map(|part| {
                        CompletedPart::builder()
                            .part_number(part.number as i32)
                            .e_tag(&part.etag)
                            .build()
                    })
                    .collect(),
            ))
            .build();
        {
            let _permit = self.permit().await;
            self.client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(self.full_key(key))
                .upload_id(s3_upload_id)
                .multipart_upload(completed)
                .send()
                .await
                .map_err(|e| failure("complete multipart upload", e))?;
        }
        self.head(key).await?.ok_or(ObjectError::NotFound)
    }

    pub async fn abort_multipart(&self, key: &str, upload_id: &str) -> ObjectResult<()> {
        let s3_upload_id = self.unseal(key, upload_id)?;
        // S3 may keep a part whose upload was in flight during the abort: abort until none is
        // left, as its documentation advises.
        for _ in 0..3 {
            {
                let _permit = self.permit().await;
                match self
                    .client
                    .abort_multipart_upload()
                    .bucket(&self.bucket)
                    .key(self.full_key(key))
                    .upload_id(s3_upload_id)
                    .send()
                    .await
                    .map_err(|e| failure("abort multipart upload", e))
                {
                    Ok(_) | Err(ObjectError::NoSuchUpload) => {}
                    Err(error) => return Err(error),
                }
            }
            match self.list_parts(key, upload_id).await {
                Err(ObjectError::NoSuchUpload) => return Ok(()),
                Ok(parts) if parts.is_empty() => return Ok(()),
                Ok(_) => continue,
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// The uploads of the app (key, upload id) with no activity since `cutoff`: started before
    /// it, and no part stored after it.
    pub async fn idle_uploads(&self, cutoff: SystemTime) -> ObjectResult<Vec<(String, String)>> {
        let cutoff = aws_sdk_s3::primitives::DateTime::from(cutoff);
        let mut idle = Vec::new();
        let (mut key_marker, mut upload_marker) = (None::<String>, None::<String>);
        loop {
            let page = {
                let _permit = self.permit().await;
                self.client
                    .list_multipart_uploads()
                    .bucket(&self.bucket)
                    .prefix(&self.app_prefix)
                    .set_key_marker(key_marker.clone())
                    .set_upload_id_marker(upload_marker.clone())
                    .send()
                    .await
                    .map_err(|e| failure("list multipart uploads", e))?
            };
            for upload in page.uploads() {
                let (Some(full_key), Some(s3_upload_id)) = (upload.key(), upload.upload_id())
                else {
                    continue;
                };
                let Some(key) = full_key.strip_prefix(&self.app_prefix) else {
                    continue;
                };
                if upload
                    .initiated()
                    .is_some_and(|started| started.secs() < cutoff.secs())
                {
                    idle.push((key.to_owned(), self.seal(key, s3_upload_id)));
                }
            }
            match page.is_truncated() {
                Some(true) => {
                    key_marker = page.next_key_marker().map(str::to_owned);
                    upload_marker = page.next_upload_id_marker().map(str::to_owned);
                    if key_marker.is_none() {
                        break;
                    }
                }
                _ => break,
            }
        }
        // Started before the cutoff, but a part may have come since.
        let mut quiet = Vec::new();
        for (key, upload_id) in idle {
            match self.last_part_stored(&key, &upload_id).await {
                Ok(latest) if latest < Some(cutoff.secs()) => quiet.push((key, upload_id)),
                Ok(_) | Err(ObjectError::NoSuchUpload) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(quiet)
    }

    /// When the upload's latest part was stored (seconds since the epoch), if it has any.
    async fn last_part_stored(&self, key: &str, upload_id: &str) -> ObjectResult<Option<i64>> {
        let parts = self.stored_parts(key, upload_id).await?;
        Ok(parts
            .iter()
            .filter_map(|part| part.last_modified().map(|time| time.secs()))
            .max())
    }

    pub async fn put(&self, key: &str, data: Vec<u8>) -> ObjectResult<ObjectInfo> {
        {
            let _permit = self.permit().await;
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(self.full_key(key))
                .body(ByteStream::from(data))
                .send()
                .await
                .map_err(|e| failure("put object", e))?;
        }
        self.head(key).await?.ok_or(ObjectError::NotFound)
    }

    pub async fn get(
        &self,
        key: &str,
        start: u64,
        length: Option<u64>,
    ) -> ObjectResult<(ObjectInfo, DynInputStream)> {
        if length == Some(0) {
            return self.empty_read(key, start).await;
        }
        let permit = self.permit().await;
        let sent = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .set_range(range_header(start, length))
            .send()
            .await;
        let object = match sent {
            Ok(object) => object,
            // S3 refuses a range that starts at the end, where the local store gives an empty
            // stream; the answer must be the same, so only then is the size asked.
            Err(SdkError::ServiceError(service))
                if service.err().code() == Some("InvalidRange") =>
            {
                drop(permit);
                return self.empty_read(key, start).await;
            }
            Err(error) => return Err(failure("get object", error)),
        };
        let size = match object
            .content_range()
            .and_then(|range| range.rsplit_once('/'))
        {
            Some((_, total)) => total.parse().unwrap_or_default(),
            None => object.content_length().unwrap_or_default() as u64,
        };
        let info = ObjectInfo {
            key: key.to_owned(),
            size,
            etag: object.e_tag().unwrap_or_default().to_owned(),
            modified: object
                .last_modified()
                .map_or(0, |time| time.secs().max(0) as u64),
        };
        Ok((
            info,
            Produced::boxed(Body {
                body: object.body,
                _permit: permit,
            }),
        ))
    }

    /// A read of nothing at `start`: empty at or before the end, refused past it.
    async fn empty_read(
        &self,
        key: &str,
        start: u64,
    ) -> ObjectResult<(ObjectInfo, DynInputStream)> {
        let info = self.head(key).await?.ok_or(ObjectError::NotFound)?;
        if start > info.size {
            return Err(ObjectError::InvalidRange);
        }
        Ok((
            info,
            crate::capabilities::streams::from_bytes(Default::default()),
        ))
    }

    pub async fn head(&self, key: &str) -> ObjectResult<Option<ObjectInfo>> {
        let _permit = self.permit().await;
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
        {
            Ok(head) => Ok(Some(ObjectInfo {
                key: key.to_owned(),
                size: head.content_length().unwrap_or_default() as u64,
                etag: head.e_tag().unwrap_or_default().to_owned(),
                modified: head
                    .last_modified()
                    .map_or(0, |time| time.secs().max(0) as u64),
            })),
            Err(SdkError::ServiceError(service)) if service.err().is_not_found() => Ok(None),
            Err(error) => Err(failure("head object", error)),
        }
    }

    pub async fn delete(&self, key: &str) -> ObjectResult<()> {
        let _permit = self.permit().await;
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
            .map_err(|e| failure("delete object", e))?;
        Ok(())
    }

    /// The objects under `prefix` by key; it stops past `limit` of them.
    pub async fn list(&self, prefix: &str, limit: usize) -> ObjectResult<Vec<ObjectInfo>> {
        let _permit = self.permit().await;
        let mut found = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(self.full_key(prefix))
                .set_continuation_token(token.clone())
                .send()
                .await
                .map_err(|e| failure("list objects", e))?;
            for object in page.contents() {
                let Some(key) = object
                    .key()
                    .and_then(|key| key.strip_prefix(&self.app_prefix))
                else {
                    continue;
                };
                found.push(ObjectInfo {
                    key: key.to_owned(),
                    size: object.size().unwrap_or_default() as u64,
                    etag: object.e_tag().unwrap_or_default().to_owned(),
                    modified: object
                        .last_modified()
                        .map_or(0, |time| time.secs().max(0) as u64),
                });
            }
            match page.next_continuation_token() {
                Some(_) if found.len() > limit => break,
                Some(next) if page.is_truncated() == Some(true) => token = Some(next.to_owned()),
                _ => break,
            }
        }
        Ok(found)
    }
}

/// An object's body as it arrives from S3, holding its request slot until it is read or dropped.
struct Body {
    body: ByteStream,
    _permit: OwnedSemaphorePermit,
}

impl Produce for Body {
    async fn next(mut self) -> (Self, Next) {
        let next = match self.body.next().await {
            Some(Ok(bytes)) => Ok(Some(bytes)),
            Some(Err(error)) => {
                Err(anyhow::Error::from(error).context("reading the object from S3 failed"))
            }
            None => Ok(None),
        };
        (self, next)
    }
}

/// The `Range` of a read of `length` bytes (or the rest) from `start`; none for the whole
/// object or no bytes. A range that would end past the largest offset reads to the end, as the
/// local store does: the guest's numbers never overflow into a wrong range.
fn range_header(start: u64, length: Option<u64>) -> Option<String> {
    match length {
        Some(0) => None,
        Some(length) => Some(match start.checked_add(length - 1) {
            Some(end) => format!("bytes={start}-{end}"),
            None => format!("bytes={start}-"),
        }),
        None if start > 0 => Some(format!("bytes={start}-")),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::range_header;

    #[test]
    fn ranges_name_the_bytes_asked_for_and_never_overflow() {
        assert_eq!(range_header(0, None), None);
        assert_eq!(range_header(5, Some(0)), None);
        assert_eq!(range_header(5, None).as_deref(), Some("bytes=5-"));
        assert_eq!(range_header(0, Some(1)).as_deref(), Some("bytes=0-0"));
        assert_eq!(range_header(10, Some(5)).as_deref(), Some("bytes=10-14"));
        assert_eq!(
            range_header(u64::MAX - 4, Some(5)).as_deref(),
            Some("bytes=18446744073709551611-18446744073709551615")
        );
        assert_eq!(range_header(2, Some(u64::MAX)).as_deref(), Some("bytes=2-"));
        assert_eq!(
            range_header(u64::MAX, Some(u64::MAX)).as_deref(),
            Some("bytes=18446744073709551615-")
        );
    }
}
