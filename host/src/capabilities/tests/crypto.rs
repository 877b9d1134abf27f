//! `host:capabilities/crypto` as a guest calls it.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use aws_lc_rs::cipher::{AES_256, EncryptingKey, UnboundCipherKey};
use base64::Engine;

use super::{Fixture, app, apps, data_dir, pattern};
use crate::capabilities::host::capabilities::crypto::{CryptoError, Host};

const IV: [u8; 16] = [0x5a; 16];

async fn encrypt(
    fixture: &mut Fixture,
    key_id: &str,
    iv: &[u8],
    offset: u64,
    data: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    fixture
        .view()
        .encrypt(key_id.to_owned(), iv.to_vec(), offset, data.to_vec())
        .await
        .expect("encrypt does not trap")
}

async fn decrypt(
    fixture: &mut Fixture,
    key_id: &str,
    iv: &[u8],
    offset: u64,
    data: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    fixture
        .view()
        .decrypt(key_id.to_owned(), iv.to_vec(), offset, data.to_vec())
        .await
        .expect("decrypt does not trap")
}

async fn new_key(fixture: &mut Fixture) -> String {
    fixture
        .view()
        .generate_key()
        .await
        .expect("generate-key does not trap")
}

#[tokio::test]
async fn encryption_round_trips_and_hides_the_plaintext() {
    let dir = data_dir();
    let mut fixture = app(dir.path(), "vault").await;
    let key = new_key(&mut fixture).await;
    let plaintext = pattern(100_000);
    let ciphertext = encrypt(&mut fixture, &key, &IV, 0, &plaintext)
        .await
        .expect("encrypted");
    assert_eq!(ciphertext.len(), plaintext.len());
    assert_ne!(ciphertext, plaintext);
    // No long run of plaintext survives (a keystream of zeros would leave it all).
    let same = ciphertext
        .iter()
        .zip(&plaintext)
        .filter(|(a, b)| a == b)
        .count();
    assert!(same < plaintext.len() / 100, "{same} bytes unchanged");
    let decrypted = decrypt(&mut fixture, &key, &IV, 0, &ciphertext)
        .await
        .expect("decrypted");
    assert_eq!(decrypted, plaintext);
    // Another IV, or another key, gives another ciphertext.
    let other_iv = encrypt(&mut fixture, &key, &[0xa5; 16], 0, &plaintext)
        .await
        .expect("encrypted");
    assert_ne!(other_iv, ciphertext);
    let other_key = new_key(&mut fixture).await;
    assert_ne!(other_key, key);
    let with_other_key = encrypt(&mut fixture, &other_key, &IV, 0, &plaintext)
        .await
        .expect("encrypted");
    assert_ne!(with_other_key, ciphertext);
}

#[tokio::test]
async fn parts_encrypted_at_their_offsets_make_the_whole() {
    let dir = data_dir();
    let mut fixture = app(dir.path(), "vault").await;
    let key = new_key(&mut fixture).await;
    let plaintext = pattern(70_000);
    let whole = encrypt(&mut fixture, &key, &IV, 0, &plaintext)
        .await
        .expect("encrypted");
    // Splits inside blocks and across them, in any order.
    let cuts = [0, 1, 15, 16, 17, 4095, 4111, 65_537, plaintext.len()];
    let mut pieces: Vec<(usize, usize)> = cuts.windows(2).map(|w| (w[0], w[1])).collect();
    pieces.reverse();
    let mut assembled = vec![0u8; plaintext.len()];
    for (start, end) in pieces {
        let part = encrypt(
            &mut fixture,
            &key,
            &IV,
            start as u64,
            &plaintext[start..end],
        )
        .await
        .expect("encrypted");
        assembled[start..end].copy_from_slice(&part);
        let back = decrypt(&mut fixture, &key, &IV, start as u64, &part)
            .await
            .expect("decrypted");
        assert_eq!(back, &plaintext[start..end], "part at {start}");
    }
    assert_eq!(assembled, whole);
}

/// The published AES-256-CTR vector (NIST SP 800-38A, F.5.5), through a key id made for its
/// key in the format `crypto.rs` documents: base64url(nonce || AES-256-GCM of the data key
/// under the master key, with the associated data `host:crypto:v1:<app>`).
#[tokio::test]
async fn the_keystream_is_aes_256_ctr_of_the_published_vector() {
    let dir = data_dir();
    let mut fixture = app(dir.path(), "vault").await;
    let key = hex::decode("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
        .expect("hex");
    let iv = hex::decode("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff").expect("hex");
    let plaintext = hex::decode(concat!(
        "6bc1bee22e409f96e93d7e117393172a",
        "ae2d8a571e03ac9c9eb76fac45af8e51",
        "30c81c46a35ce411e5fbc1191a0a52ef",
        "f69f2445df4f9b17ad2b417be66c3710",
    ))
    .expect("hex");
    let ciphertext = hex::decode(concat!(
        "601ec313775789a5b7a7f504bbf3d228",
        "f443e3ca4d62b59aca84e990cacaf5c5",
        "2b0930daa23de94ce87017ba2d84988d",
        "dfc9c58db67aada613c2dd08457941a6",
    ))
    .expect("hex");
    let key_id = wrap_key(&key, "vault");
    let encrypted = encrypt(&mut fixture, &key_id, &iv, 0, &plaintext)
        .await
        .expect("the documented key id format is accepted");
    assert_eq!(hex::encode(&encrypted), hex::encode(&ciphertext));
    // The bytes at an offset inside a block are those of the whole at that offset.
    let encrypted = encrypt(&mut fixture, &key_id, &iv, 21, &plaintext[21..50])
        .await
        .expect("encrypted");
    assert_eq!(hex::encode(&encrypted), hex::encode(&ciphertext[21..50]));
}

/// The counter is `iv + offset / 16` as one 128-bit big-endian number, wrapping at 2^128, and
/// the keystream is used from byte `offset % 16` of its block: checked against AES-256 applied
/// to each counter block, for a key the app generated.
#[tokio::test]
async fn the_counter_is_the_iv_plus_the_block_number_as_documented() {
    let dir = data_dir();
    let mut fixture = app(dir.path(), "vault").await;
    let key_id = new_key(&mut fixture).await;
    let key = fixture
        .capabilities
        .crypto
        .unwrap_key(&key_id)
        .expect("the app's own key id unwraps");
    // The counter wraps from all ones to zero after the third block.
    let iv = (u128::MAX - 2).to_be_bytes();
    let blocks = 8u64;
    let mut keystream = Vec::new();
    for block in 0..blocks {
        keystream
            .extend_from_slice(&(u128::from_be_bytes(iv).wrapping_add(block.into())).to_be_bytes());
    }
    EncryptingKey::ecb(UnboundCipherKey::new(&AES_256, &key).expect("an AES-256 key"))
        .expect("an ECB key")
        .encrypt(&mut keystream)
        .expect("whole blocks");
    let plaintext = pattern(keystream.len());
    for (offset, length) in [(0, 128), (5, 40), (16, 33), (47, 1), (31, 70), (48, 80)] {
        let expected: Vec<u8> = plaintext[offset..offset + length]
            .iter()
            .zip(&keystream[offset..])
            .map(|(byte, key)| byte ^ key)
            .collect();
        let encrypted = encrypt(
            &mut fixture,
            &key_id,
            &iv,
            offset as u64,
            &plaintext[offset..offset + length],
        )
        .await
        .expect("encrypted");
        assert_eq!(encrypted, expected, "{length} bytes at {offset}");
    }
    // Far into an object (block 2^59), the counter is the IV plus the block number all the same.
    let far = 1u64 << 63;
    let mut counter = u128::from_be_bytes(iv)
        .wrapping_add(u128::from(far / 16))
        .to_be_bytes();
    EncryptingKey::ecb(UnboundCipherKey::new(&AES_256, &key).expect("an AES-256 key"))
        .expect("an ECB key")
        .encrypt(&mut counter)
        .expect("one block");
    let encrypted = encrypt(&mut fixture, &key_id, &iv, far + 3, &[0u8; 13])
        .await
        .expect("encrypted");
    assert_eq!(encrypted, &counter[3..]);
}

#[tokio::test]
async fn bytes_reaching_offset_2_pow_64_are_out_of_range() {
    let dir = data_dir();
    let mut fixture = app(dir.path(), "vault").await;
    let key = new_key(&mut fixture).await;
    // The last ten bytes before 2^64 are the object's own.
    let last = encrypt(&mut fixture, &key, &IV, u64::MAX - 10, &[1; 10]).await;
    assert!(last.is_ok(), "{last:?}");
    for (offset, length) in [(u64::MAX - 9, 10), (u64::MAX, 1), (u64::MAX - 3, 100_000)] {
        let refused = encrypt(&mut fixture, &key, &IV, offset, &vec![1; length]).await;
        assert!(
            matches!(refused, Err(CryptoError::OutOfRange)),
            "{length} bytes at {offset}: {refused:?}"
        );
        let refused = decrypt(&mut fixture, &key, &IV, offset, &vec![1; length]).await;
        assert!(
            matches!(refused, Err(CryptoError::OutOfRange)),
            "{refused:?}"
        );
    }
    // A stream cannot count past it either: it fails rather than reuse the keystream's start.
    let source = fixture.stream_of(&[1; 100]);
    let stream = fixture
        .view()
        .encrypt_stream(key.clone(), IV.to_vec(), u64::MAX - 9, source)
        .await
        .expect("encrypt-stream does not trap")
        .expect("the stream is made; its bytes are checked as they pass");
    let read = fixture.read_stream(stream).await;
    assert!(read.is_err(), "{read:?}");
}

#[tokio::test]
async fn bad_key_ids_and_ivs_are_refused() {
    let dir = data_dir();
    let mut fixture = app(dir.path(), "vault").await;
    let key = new_key(&mut fixture).await;
    for iv in [&[0u8; 15][..], &[0u8; 17][..], &[][..]] {
        let refused = encrypt(&mut fixture, &key, iv, 0, b"data").await;
        assert!(
            matches!(refused, Err(CryptoError::InvalidIv)),
            "{refused:?}"
        );
    }
    let mut altered = key.clone().into_bytes();
    altered[10] = if altered[10] == b'A' { b'B' } else { b'A' };
    let altered = String::from_utf8(altered).expect("base64 stays ASCII");
    for key_id in [altered.as_str(), "", "not a key id", &key[..key.len() - 1]] {
        let refused = encrypt(&mut fixture, key_id, &IV, 0, b"data").await;
        assert!(
            matches!(refused, Err(CryptoError::InvalidKey)),
            "{key_id:?}: {refused:?}"
        );
    }
    let source = fixture.stream_of(b"data");
    let refused = fixture
        .view()
        .decrypt_stream(altered, IV.to_vec(), 0, source)
        .await
        .expect("decrypt-stream does not trap");
    assert!(matches!(refused, Err(CryptoError::InvalidKey)));
}

#[tokio::test]
async fn streams_give_the_bytes_that_encrypt_gives() {
    let dir = data_dir();
    let mut fixture = app(dir.path(), "vault").await;
    let key = new_key(&mut fixture).await;
    // Several chunks of the stream stages, and an offset inside a block.
    let plaintext = pattern(700_000);
    let offset = 12_345;
    let expected = encrypt(&mut fixture, &key, &IV, offset, &plaintext)
        .await
        .expect("encrypted");
    let source = fixture.stream_of(&plaintext);
    let stream = fixture
        .view()
        .encrypt_stream(key.clone(), IV.to_vec(), offset, source)
        .await
        .expect("encrypt-stream does not trap")
        .expect("a stream");
    let encrypted = fixture.read_stream(stream).await.expect("the stream reads");
    assert_eq!(encrypted, expected);
    let source = fixture.stream_of(&encrypted);
    let stream = fixture
        .view()
        .decrypt_stream(key, IV.to_vec(), offset, source)
        .await
        .expect("decrypt-stream does not trap")
        .expect("a stream");
    assert_eq!(
        fixture.read_stream(stream).await.expect("the stream reads"),
        plaintext
    );
}

#[tokio::test]
async fn one_apps_key_ids_are_refused_to_another() {
    let dir = data_dir();
    let [mut first, mut second] = apps(dir.path(), ["first", "second"]).await;
    let first_key = new_key(&mut first).await;
    let second_key = new_key(&mut second).await;
    let refused = encrypt(&mut second, &first_key, &IV, 0, b"secret").await;
    assert!(
        matches!(refused, Err(CryptoError::InvalidKey)),
        "{refused:?}"
    );
    let refused = encrypt(&mut first, &second_key, &IV, 0, b"secret").await;
    assert!(
        matches!(refused, Err(CryptoError::InvalidKey)),
        "{refused:?}"
    );
    // The same data key wrapped for each app: each id works only in its own app.
    let key = [7u8; 32];
    let for_first = wrap_key(&key, "first");
    let for_second = wrap_key(&key, "second");
    assert!(encrypt(&mut first, &for_first, &IV, 0, b"x").await.is_ok());
    let refused = encrypt(&mut first, &for_second, &IV, 0, b"x").await;
    assert!(
        matches!(refused, Err(CryptoError::InvalidKey)),
        "{refused:?}"
    );
    assert!(
        encrypt(&mut second, &for_second, &IV, 0, b"x")
            .await
            .is_ok()
    );
}

/// A key id for `key`, issued to `app` by a host with the tests' master key, in the format
/// `crypto.rs` documents.
fn wrap_key(key: &[u8], app: &str) -> String {
    let master = hex::decode(super::MASTER_KEY).expect("hex");
    let master = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &master).expect("a 256-bit key"));
    let nonce = [9u8; 12];
    let mut wrapped = key.to_vec();
    master
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(format!("host:crypto:v1:{app}").as_bytes()),
            &mut wrapped,
        )
        .expect("sealed");
    let mut id = nonce.to_vec();
    id.extend_from_slice(&wrapped);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id)
}
