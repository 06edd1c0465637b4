//! Handing a TLS listener's established session to the kernel (kTLS).
//!
//! Once a TLS tunnel's handshakes are done (TLS, then the HTTP upgrade or
//! the tcp listener's connect), rustls gives up the session's traffic keys
//! and sequence numbers and the kernel takes them (`setsockopt(SOL_TLS)`):
//! the socket then reads plaintext and writes records by itself, and the
//! tunnel runs on the `ktls` relay ([`crate::dataplane::ktls`]) instead of
//! the userspace `tls` relay.
//!
//! The handoff must lose nothing. Bytes rustls decrypted but did not give
//! out yet become leftovers the relay delivers first; bytes rustls read but
//! could not decrypt yet (part of a record) cannot be given back to the
//! socket, so the handoff is made only when rustls's reads ended on a
//! record boundary ([`super::records::Records`]) and rustls has nothing
//! left to send. Otherwise, and for a cipher the kernel did not take at
//! start, the tunnel stays in userspace, counted by why
//! (`upsplice_ktls_handoffs_total`). Once the keys have left rustls, a
//! kernel refusal cannot be undone: that tunnel is reset (counted as
//! `failed`; the self-test at start makes it unexpected).

use std::io::Read;
use std::os::fd::AsRawFd;

use bytes::{Bytes, BytesMut};
use tokio::net::TcpStream;

use crate::dataplane::ktls::sys::{Cipher, CryptoInfo};
use crate::dataplane::ktls::{self, KtlsRelay};
use crate::handshake::TlsClient;

/// What became of a TLS tunnel offered to the kernel.
pub enum Offload {
    /// The kernel carries the session. `plaintext`: what rustls had
    /// decrypted and not given out, to deliver before the socket's bytes.
    Kernel { socket: TcpStream, plaintext: Bytes, cipher: Cipher },
    /// It stays on the userspace relay, intact; `plaintext` was taken out
    /// of rustls on the way and goes first all the same.
    Userspace { stream: TlsClient, plaintext: Bytes, why: &'static str },
    /// The keys left rustls but the kernel refused them: the connection
    /// cannot go on (reset it).
    Failed { socket: TcpStream, why: String },
}

/// The kernel cipher of a negotiated suite, if kTLS carries it.
fn cipher_of(suite: rustls::SupportedCipherSuite) -> Option<Cipher> {
    // rustls names suites as their IANA names (TLS13_AES_128_GCM_SHA256,
    // TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384, ...).
    let name = format!("{:?}", suite.suite());
    if name.contains("AES_128_GCM") {
        Some(Cipher::AesGcm128)
    } else if name.contains("AES_256_GCM") {
        Some(Cipher::AesGcm256)
    } else if name.contains("CHACHA20_POLY1305") {
        Some(Cipher::Chacha20Poly1305)
    } else {
        None
    }
}

/// Offers `stream`'s session to the kernel (see the module docs).
pub fn offload(mut stream: TlsClient, relay: &KtlsRelay) -> Offload {
    let keep = |stream, plaintext, why| Offload::Userspace { stream, plaintext, why };
    let (records, conn) = stream.get_ref();
    if conn.is_handshaking() {
        return keep(stream, Bytes::new(), "handshaking");
    }
    if conn.wants_write() {
        return keep(stream, Bytes::new(), "records_unsent");
    }
    if !records.at_boundary() {
        return keep(stream, Bytes::new(), "mid_record");
    }
    let (Some(version), Some(suite)) = (conn.protocol_version(), conn.negotiated_cipher_suite()) else {
        return keep(stream, Bytes::new(), "no_session");
    };
    match cipher_of(suite) {
        Some(cipher) if relay.takes(cipher) => {}
        _ => return keep(stream, Bytes::new(), "cipher_not_in_kernel"),
    }
    // What rustls decrypted and holds: out now, delivered first either way.
    let mut plaintext = BytesMut::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.get_mut().1.reader().read(&mut chunk) {
            Ok(0) => return keep(stream, plaintext.freeze(), "peer_closed"),
            Ok(n) => plaintext.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(_) => return keep(stream, plaintext.freeze(), "peer_closed"),
        }
    }
    // The ULP first, while rustls still holds the session: the kernel
    // takes it only on an ESTABLISHED socket (ENOTCONN once the client's
    // FIN came in), and until keys are set the socket reads and writes as
    // plain TCP, so a refusal here leaves the tunnel whole in userspace.
    if let Err(e) = ktls::sys::attach_ulp(stream.get_ref().0.get_ref().as_raw_fd()) {
        let why = if e.raw_os_error() == Some(libc::ENOTCONN) { "not_established" } else { "ulp_refused" };
        return keep(stream, plaintext.freeze(), why);
    }
    let (records, conn) = (*stream).into_inner();
    let socket = records.into_inner();
    let secrets = match conn.dangerous_extract_secrets() {
        Ok(s) => s,
        Err(e) => return Offload::Failed { socket, why: format!("rustls kept the keys: {e}") },
    };
    let keys = CryptoInfo::new(version, secrets.tx.0, &secrets.tx.1)
        .and_then(|tx| Ok((tx, CryptoInfo::new(version, secrets.rx.0, &secrets.rx.1)?)));
    let (tx, rx) = match keys {
        Ok(k) => k,
        Err(why) => return Offload::Failed { socket, why },
    };
    match ktls::install_keys(socket.as_raw_fd(), &tx, &rx) {
        Ok(()) => Offload::Kernel { socket, plaintext: plaintext.freeze(), cipher: tx.cipher() },
        Err(e) => Offload::Failed { socket, why: format!("the kernel refused the {} keys: {e}", tx.cipher().name()) },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_suite_rustls_offers_has_a_kernel_cipher() {
        for &suite in rustls::crypto::ring::ALL_CIPHER_SUITES {
            assert!(cipher_of(suite).is_some(), "{:?}", suite.suite());
        }
        let names: Vec<Cipher> =
            rustls::crypto::ring::ALL_CIPHER_SUITES.iter().copied().filter_map(cipher_of).collect();
        for c in [Cipher::AesGcm128, Cipher::AesGcm256, Cipher::Chacha20Poly1305] {
            assert!(names.contains(&c), "{c:?}");
        }
    }
}
