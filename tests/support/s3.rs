//! A real S3 API server (moto's server mode) for the tests.

use super::*;

/// A real S3 API server (moto's server mode) on a free loopback port, with one bucket. Stopped
/// when dropped; `stop` and `restart` make outages (moto keeps its data in memory: a restarted
/// server is empty but for the bucket).
pub struct S3Server {
    child: Option<Child>,
    pub addr: SocketAddr,
    bucket: String,
    log: tempfile::NamedTempFile,
}

impl S3Server {
    pub fn start(bucket: &str) -> S3Server {
        let mut server = S3Server {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            bucket: bucket.to_owned(),
            log: tempfile::NamedTempFile::new().expect("cannot create the S3 server's log"),
        };
        server.restart();
        server
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `--storage s3://<bucket>/<prefix> --s3-endpoint … --s3-path-style`, and the credentials
    /// are the environment's (see `credentials`).
    pub fn host_args(&self, bucket: &str, prefix: &str) -> Vec<String> {
        vec![
            "--storage".into(),
            format!("s3://{bucket}/{prefix}"),
            "--s3-endpoint".into(),
            self.endpoint(),
            "--s3-path-style".into(),
            "--s3-region".into(),
            "us-east-1".into(),
        ]
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server (again), waits until it answers, and makes the bucket.
    pub fn restart(&mut self) {
        self.stop();
        let program = std::env::var("BLACKBOX_S3_SERVER").unwrap_or_else(|_| {
            repo_root()
                .join("target/s3-server/bin/moto_server")
                .to_string_lossy()
                .into_owned()
        });
        let log = self.log.reopen().expect("cannot open the S3 server's log");
        let child = Command::new(&program)
            .args(["-H", "127.0.0.1", "-p", &self.addr.port().to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cannot share the S3 server's log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|error| {
                panic!("cannot start the S3 API server {program} ({error}): run tests/run, which installs it")
            });
        self.child = Some(child);
        let answers = poll_until(START_DEADLINE, POLL_INTERVAL, || {
            TcpStream::connect_timeout(&self.addr, Duration::from_millis(200))
                .ok()
                .map(|_| ())
        });
        assert!(
            answers.is_some(),
            "the S3 API server did not start: {}",
            self.log_text()
        );
        let created = self.request("PUT", &format!("/{}", self.bucket));
        assert_eq!(
            created.status,
            200,
            "cannot create the bucket: {}",
            created.body_text()
        );
    }

    fn log_text(&self) -> String {
        fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    fn request(&self, method: &str, target: &str) -> RawResponse {
        raw_request(
            self.addr,
            format!(
                "{method} {target} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                self.addr
            )
            .as_bytes(),
        )
    }

    /// Every key in the bucket.
    pub fn keys(&self) -> Vec<String> {
        let listing = self.request("GET", &format!("/{}?list-type=2", self.bucket));
        xml_values(&listing.body_text(), "Key")
    }

    /// The keys of the multipart uploads in progress in the bucket.
    pub fn uploads(&self) -> Vec<String> {
        let listing = self.request("GET", &format!("/{}?uploads", self.bucket));
        xml_values(&listing.body_text(), "Key")
    }

    /// The bytes of an object.
    pub fn object(&self, key: &str) -> Vec<u8> {
        let response = self.request("GET", &format!("/{}/{key}", self.bucket));
        assert_eq!(response.status, 200, "{key}: {}", response.body_text());
        response.body
    }

    /// The ETags (without quotes) of the parts stored for the uploads in progress of `key`.
    pub fn part_etags(&self, key: &str) -> Vec<String> {
        let uploads = self.request("GET", &format!("/{}?uploads&prefix={key}", self.bucket));
        xml_values(&uploads.body_text(), "UploadId")
            .iter()
            .flat_map(|upload_id| {
                let parts = self.request(
                    "GET",
                    &format!("/{}/{key}?uploadId={upload_id}", self.bucket),
                );
                xml_values(&parts.body_text(), "ETag")
            })
            .map(|etag| {
                etag.replace("&quot;", "")
                    .replace("&#34;", "")
                    .replace('"', "")
            })
            .collect()
    }

    /// The parts stored for an upload (empty when the upload is gone).
    pub fn parts(&self, key: &str, upload_id: &str) -> Vec<String> {
        let listing = self.request(
            "GET",
            &format!("/{}/{key}?uploadId={upload_id}", self.bucket),
        );
        xml_values(&listing.body_text(), "PartNumber")
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn xml_values(xml: &str, element: &str) -> Vec<String> {
    let open = format!("<{element}>");
    let close = format!("</{element}>");
    xml.split(&open)
        .skip(1)
        .filter_map(|rest| rest.split_once(&close).map(|(value, _)| value.to_owned()))
        .collect()
}
