//! Where an app's objects are kept (`--storage`) and how S3 is reached: settings, read before
//! any store exists.

use std::path::PathBuf;

use anyhow::{Result, bail};

/// Where objects are kept, from `--storage`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Storage {
    /// Under this directory (the default: `<data-dir>/apps`).
    Local(Option<PathBuf>),
    S3(S3Location),
}

impl Storage {
    /// `local`, a directory path, or `s3://BUCKET[/PREFIX]`.
    pub fn parse(text: &str) -> Result<Storage> {
        let text = text.trim();
        if text.is_empty() || text == "local" {
            return Ok(Storage::Local(None));
        }
        if let Some(rest) = text.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                bail!(
                    "--storage {text:?}: an S3 location needs a bucket, as in s3://my-bucket/some/prefix"
                );
            }
            let prefix = prefix.trim_matches('/');
            return Ok(Storage::S3(S3Location {
                bucket: bucket.to_owned(),
                prefix: if prefix.is_empty() {
                    String::new()
                } else {
                    format!("{prefix}/")
                },
            }));
        }
        if text.contains("://") {
            bail!("--storage {text:?}: expected `local`, a directory, or s3://BUCKET[/PREFIX]");
        }
        Ok(Storage::Local(Some(PathBuf::from(text))))
    }
}

/// Settings of the S3 client, as the seed configured boto3.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct S3Settings {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: bool,
}

/// A bucket and the prefix under which the host keeps its apps' objects.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct S3Location {
    pub bucket: String,
    /// Empty, or ending with `/`.
    pub prefix: String,
}
