//! XChaCha20-Poly1305 for bulk data, built the standard way from two vetted pieces:
//! HChaCha20 from RustCrypto's `chacha20` derives a one-message key from the key and the
//! first 16 nonce bytes, and `ring`'s ChaCha20-Poly1305 (RFC 8439, assembly with AVX2)
//! seals under that key with nonce `0000 || nonce[16..24]`. This is the construction of
//! draft-irtf-cfrg-xchacha §2.3 (as libsodium builds it); the output is byte for byte that
//! of `chacha20poly1305::XChaCha20Poly1305`, which the tests check on random inputs and the
//! draft's test vector. It is used for its speed: `ring`'s ChaCha20-Poly1305 is assembly.
//!
//! Secrets: the long-lived key lives in a zeroizing array here; the one-message key is
//! zeroized in our buffers, but unwiped copies remain on the stack: `chacha20::hchacha`'s
//! working state and `ring`'s key value. Such a copy opens only the messages sealed under
//! the same 16-byte nonce prefix, that is the one message (nonces are random, 24 bytes).

use chacha20::cipher::consts::U10;
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, CHACHA20_POLY1305};
use zeroize::{Zeroize, Zeroizing};

/// Size of the authentication tag.
pub const TAG_LEN: usize = 16;
/// Size of the extended nonce.
pub const NONCE_LEN: usize = 24;

/// The tag did not verify, or the key could not be set up: the message is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AeadError;

/// An XChaCha20-Poly1305 key.
pub struct XChaCha {
    key: Zeroizing<[u8; 32]>,
}

impl XChaCha {
    /// A cipher under `key`.
    pub fn new(key: &[u8; 32]) -> Self {
        Self {
            key: Zeroizing::new(*key),
        }
    }

    /// The one-message ChaCha20-Poly1305 key and nonce for `nonce`.
    fn message_key(&self, nonce: &[u8; NONCE_LEN]) -> Result<(LessSafeKey, Nonce), AeadError> {
        let mut head = [0u8; 16];
        head.copy_from_slice(&nonce[..16]);
        let mut sub = Zeroizing::new([0u8; 32]);
        let mut out = chacha20::hchacha::<U10>((&*self.key).into(), (&head).into());
        sub.copy_from_slice(&out);
        out.zeroize();
        let key = UnboundKey::new(&CHACHA20_POLY1305, &sub[..]).map_err(|_| AeadError)?;
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&nonce[16..]);
        Ok((LessSafeKey::new(key), Nonce::assume_unique_for_key(n)))
    }

    /// Encrypts `buf` in place and returns the tag.
    pub fn seal_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN], AeadError> {
        let (key, n) = self.message_key(nonce)?;
        let tag = key
            .seal_in_place_separate_tag(n, Aad::from(aad), buf)
            .map_err(|_| AeadError)?;
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Checks `tag` and decrypts `buf` in place. On failure `buf` holds no plaintext:
    /// ring decrypts, compares the tags, and zeroes the buffer when they differ (so the
    /// ciphertext is gone too).
    pub fn open_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), AeadError> {
        let (key, n) = self.message_key(nonce)?;
        key.open_in_place_separate_tag(n, Aad::from(aad), Tag::from(*tag), buf, 0..)
            .map(|_| ())
            .map_err(|_| AeadError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chacha20poly1305::aead::{AeadInPlace, KeyInit};
    use chacha20poly1305::{XChaCha20Poly1305, XNonce};
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    /// draft-irtf-cfrg-xchacha-03, appendix A.3.1.
    #[test]
    fn matches_the_drafts_test_vector() {
        let key: [u8; 32] = hex("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f")
            .try_into()
            .expect("32");
        let nonce: [u8; 24] = hex("404142434445464748494a4b4c4d4e4f5051525354555657")
            .try_into()
            .expect("24");
        let aad = hex("50515253c0c1c2c3c4c5c6c7");
        let plain = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";
        let want_ct = hex(concat!(
            "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb",
            "731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c54c216cb96b72e1213b452",
            "2f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9",
            "21f9664c97637da9768812f615c68b13b52e"
        ));
        let want_tag = hex("c0875924c1c7987947deafd8780acf49");
        let c = XChaCha::new(&key);
        let mut buf = plain.to_vec();
        let tag = c.seal_in_place(&nonce, &aad, &mut buf).expect("seal");
        assert_eq!(buf, want_ct);
        assert_eq!(tag.to_vec(), want_tag);
        c.open_in_place(&nonce, &aad, &mut buf, &tag).expect("open");
        assert_eq!(buf, plain);
    }

    #[test]
    fn a_flipped_bit_anywhere_is_refused() {
        let c = XChaCha::new(&[9; 32]);
        let nonce = [3u8; 24];
        let mut buf = vec![5u8; 100];
        let tag = c.seal_in_place(&nonce, b"ad", &mut buf).expect("seal");
        let mut bad = buf.clone();
        bad[50] ^= 1;
        assert_eq!(
            c.open_in_place(&nonce, b"ad", &mut bad, &tag),
            Err(AeadError)
        );
        let mut bad_tag = tag;
        bad_tag[0] ^= 0x80;
        let mut b = buf.clone();
        assert_eq!(
            c.open_in_place(&nonce, b"ad", &mut b, &bad_tag),
            Err(AeadError)
        );
        let mut b = buf.clone();
        assert_eq!(c.open_in_place(&nonce, b"ae", &mut b, &tag), Err(AeadError));
        let mut other_nonce = nonce;
        other_nonce[20] ^= 1;
        let mut b = buf.clone();
        assert_eq!(
            c.open_in_place(&other_nonce, b"ad", &mut b, &tag),
            Err(AeadError)
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn same_bytes_as_rustcrypto_xchacha20poly1305(
            key in any::<[u8; 32]>(),
            nonce in any::<[u8; 24]>(),
            aad in proptest::collection::vec(any::<u8>(), 0..64),
            plain in proptest::collection::vec(any::<u8>(), 0..5000),
        ) {
            let ours = XChaCha::new(&key);
            let theirs = XChaCha20Poly1305::new((&key).into());
            let mut a = plain.clone();
            let tag_a = ours.seal_in_place(&nonce, &aad, &mut a).expect("seal");
            let mut b = plain.clone();
            let tag_b = theirs
                .encrypt_in_place_detached(XNonce::from_slice(&nonce), &aad, &mut b)
                .expect("seal");
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(&tag_a[..], tag_b.as_slice());
            // Each opens the other's output.
            theirs
                .decrypt_in_place_detached(XNonce::from_slice(&nonce), &aad, &mut b, &tag_b)
                .expect("open");
            prop_assert_eq!(&b, &plain);
            ours.open_in_place(&nonce, &aad, &mut a, &tag_a).expect("open");
            prop_assert_eq!(&a, &plain);
        }
    }
}
