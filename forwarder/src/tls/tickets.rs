//! Session ticket keys shared by the nodes of a fleet (`[listener.tls]
//! ticket_keys`): a ticket one node issues resumes on any node that has
//! its key, so a client moved by the load balancer skips the full
//! handshake.
//!
//! The file holds one key per line, base64 (standard alphabet) of at least
//! [`MIN_SECRET`] random bytes (`openssl rand -base64 32`); blank lines and
//! lines starting with `#` are skipped. The first key encrypts, every key
//! decrypts: rotation is prepending a new key (on every node, then
//! SIGHUP), and dropping the last one once the tickets it made have
//! expired ([`LIFETIME`]).
//!
//! From each secret, HKDF-SHA256 derives an AES-256-GCM key and a 16-byte
//! key name (not secret). A ticket is `name ‖ nonce ‖ AEAD(state, aad =
//! name)`: the name picks the key that opens it.

use std::fmt;
use std::path::Path;

use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use rustls::server::ProducesTickets;

use super::TlsError;

/// The fewest bytes a key line must decode to.
pub const MIN_SECRET: usize = 32;
/// What clients are told a ticket is good for (seconds): rustls's own
/// ticketer's 12 hours. Rotate the first key at least this often.
pub const LIFETIME: u32 = 12 * 60 * 60;

const NAME_LEN: usize = 16;
const SALT: &[u8] = b"upsplice session ticket key";

/// One key of the file.
struct Key {
    name: [u8; NAME_LEN],
    aead: LessSafeKey,
}

/// The keys of one ticket-key file: rustls's ticket producer for every
/// TLS listener that names it.
pub struct SharedTicketer {
    /// Never empty; the first encrypts.
    keys: Vec<Key>,
    random: SystemRandom,
}

impl SharedTicketer {
    /// Reads the key file at `path`; an error names the file, and the
    /// line for a bad key.
    pub fn load(path: &Path) -> Result<SharedTicketer, TlsError> {
        let file_error = |problem: String| TlsError::File { path: path.to_path_buf(), problem };
        let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
        SharedTicketer::parse(&text).map_err(file_error)
    }

    /// The keys of a file's text (the format in the module docs).
    pub fn parse(text: &str) -> Result<SharedTicketer, String> {
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let secret = base64::engine::general_purpose::STANDARD
                .decode(line)
                .map_err(|e| format!("line {}: not base64 ({e})", i + 1))?;
            if secret.len() < MIN_SECRET {
                return Err(format!(
                    "line {}: a key of {} bytes; each must be at least {MIN_SECRET} random bytes",
                    i + 1,
                    secret.len()
                ));
            }
            keys.push(Key::derive(&secret));
        }
        if keys.is_empty() {
            return Err("no keys (one base64 key per line, the first encrypts)".into());
        }
        Ok(SharedTicketer { keys, random: SystemRandom::new() })
    }
}

/// The length HKDF is asked for: `hkdf::KeyType` for a plain byte count.
struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

impl Key {
    fn derive(secret: &[u8]) -> Key {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(secret);
        // Both lengths are far below HKDF-SHA256's limit (255 × 32 bytes),
        // the only failure `expand` and `fill` have.
        let aead = UnboundKey::from(prk.expand(&[b"aes-256-gcm key"], &AES_256_GCM).expect("HKDF length"));
        let mut name = [0u8; NAME_LEN];
        prk.expand(&[b"key name"], Len(NAME_LEN)).and_then(|okm| okm.fill(&mut name)).expect("HKDF length");
        Key { name, aead: LessSafeKey::new(aead) }
    }
}

impl ProducesTickets for SharedTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        LIFETIME
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let key = &self.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        self.random.fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(NAME_LEN + NONCE_LEN + plain.len() + AES_256_GCM.tag_len());
        out.extend_from_slice(&key.name);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let tag = key
            .aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(key.name),
                &mut out[NAME_LEN + NONCE_LEN..],
            )
            .ok()?;
        out.extend_from_slice(tag.as_ref());
        Some(out)
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        // Attacker-controlled: every length is checked, nothing panics.
        let (name, rest) = ticket.split_at_checked(NAME_LEN)?;
        let (nonce, sealed) = rest.split_at_checked(NONCE_LEN)?;
        let key = self.keys.iter().find(|k| k.name == name)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut out = sealed.to_vec();
        let len = key.aead.open_in_place(nonce, Aad::from(&key.name), &mut out).ok()?.len();
        out.truncate(len);
        Some(out)
    }
}

impl fmt::Debug for SharedTicketer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Key names only: never the keys.
        f.debug_struct("SharedTicketer").field("keys", &self.keys.len()).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_line(byte: u8, len: usize) -> String {
        base64::engine::general_purpose::STANDARD.encode(vec![byte; len])
    }

    #[test]
    fn the_first_key_encrypts_and_every_key_decrypts() {
        let old = SharedTicketer::parse(&key_line(1, 32)).unwrap();
        let rotated =
            SharedTicketer::parse(&format!("# new first\n{}\n\n{}\n", key_line(2, 48), key_line(1, 32))).unwrap();
        let new_only = SharedTicketer::parse(&key_line(2, 48)).unwrap();
        let ticket = old.encrypt(b"session state").unwrap();
        assert_eq!(rotated.decrypt(&ticket).as_deref(), Some(&b"session state"[..]), "an old ticket after rotation");
        assert_eq!(new_only.decrypt(&ticket), None, "a ticket of a dropped key");
        let fresh = rotated.encrypt(b"later").unwrap();
        assert_eq!(new_only.decrypt(&fresh).as_deref(), Some(&b"later"[..]), "the first key encrypts");
        assert_eq!(old.decrypt(&fresh), None);
    }

    #[test]
    fn tampered_and_short_tickets_are_refused() {
        let t = SharedTicketer::parse(&key_line(7, 32)).unwrap();
        let mut ticket = t.encrypt(b"state").unwrap();
        for len in 0..ticket.len() {
            assert_eq!(t.decrypt(&ticket[..len]), None, "truncated to {len}");
        }
        let last = ticket.len() - 1;
        ticket[last] ^= 1;
        assert_eq!(t.decrypt(&ticket), None);
    }

    #[test]
    fn bad_files_say_which_line_and_why() {
        let err = |text: &str| SharedTicketer::parse(text).err().unwrap();
        assert!(err("").contains("no keys"));
        assert!(err("# only a comment\n").contains("no keys"));
        assert!(err(&format!("{}\nnot base64!\n", key_line(1, 32))).starts_with("line 2: not base64"));
        assert!(err(&key_line(1, 16)).contains("line 1: a key of 16 bytes"));
    }
}
