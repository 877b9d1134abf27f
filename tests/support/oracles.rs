//! Independent computations the tests compare the host's answers with: the documented key
//! wrapping, and openssl's AES-CTR.

use super::*;

/// The master key of the tests' hosts, so a test can unwrap the key ids a guest was given.
pub const MASTER_KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

/// The data key behind a key id, unwrapped as the README documents:
/// base64url(nonce[12] || AES-256-GCM(master key, data key)) with AAD `host:crypto:v1:<app>`.
pub fn unwrap_key_id(key_id: &str, app: &str) -> Vec<u8> {
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    use base64::Engine;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(key_id)
        .expect("a key id is base64url");
    let (nonce, wrapped) = bytes.split_at(12);
    let master: [u8; 32] = hex::decode(MASTER_KEY).unwrap().try_into().unwrap();
    let nonce: [u8; 12] = nonce.try_into().unwrap();
    let aad = format!("host:crypto:v1:{app}");
    aes_gcm::Aes256Gcm::new(&master.into())
        .decrypt(
            &aes_gcm::Nonce::from(nonce),
            Payload {
                msg: wrapped,
                aad: aad.as_bytes(),
            },
        )
        .expect("the key id does not unwrap as documented")
}

/// `openssl enc -aes-256-ctr` of `plaintext`: the independent AES-CTR the tests compare with.
pub fn openssl_ctr(key: &[u8], iv_hex: &str, plaintext: &[u8]) -> Vec<u8> {
    let mut child = Command::new("openssl")
        .args([
            "enc",
            "-aes-256-ctr",
            "-nosalt",
            "-K",
            &hex::encode(key),
            "-iv",
            iv_hex,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the openssl command is needed as the independent AES-CTR");
    let mut stdin = child.stdin.take().expect("a piped stdin");
    let input = plaintext.to_vec();
    // Written from another thread, so a large input cannot fill both pipes.
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let output = child.wait_with_output().expect("openssl ran");
    writer
        .join()
        .expect("the writer thread")
        .expect("openssl took the input");
    output.stdout
}
