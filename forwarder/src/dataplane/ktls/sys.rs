//! The kernel's TLS interface (`Documentation/networking/tls.rst`): the
//! `tls` upper-layer protocol on a TCP socket, the keys of each direction,
//! and records that are not application data (alerts, handshake
//! messages), which travel with a control message naming their type.
//!
//! Written on libc rather than the `ktls` crate: that crate wraps the
//! stream types (its own cork stream under tokio-rustls, its own stream
//! after the handoff), while upsplice hands the bare socket to its splice
//! relay and handles control records there; what remains of it here is
//! the mapping from rustls's secrets to the kernel's structs.

use std::io;
use std::mem::size_of;
use std::os::fd::RawFd;

use rustls::{ConnectionTrafficSecrets, ProtocolVersion};

/// TLS record content types (RFC 8446 §5.1).
pub const ALERT: u8 = 21;
pub const HANDSHAKE: u8 = 22;
pub const APPLICATION_DATA: u8 = 23;

/// Alert levels and the descriptions the relay sends or must tell apart.
pub const WARNING: u8 = 1;
pub const CLOSE_NOTIFY: u8 = 0;
pub const NO_RENEGOTIATION: u8 = 100;

/// The ciphers kTLS carries that rustls negotiates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cipher {
    AesGcm128,
    AesGcm256,
    Chacha20Poly1305,
}

impl Cipher {
    /// The name logs and `upsplice check` give.
    pub fn name(self) -> &'static str {
        match self {
            Cipher::AesGcm128 => "AES-128-GCM",
            Cipher::AesGcm256 => "AES-256-GCM",
            Cipher::Chacha20Poly1305 => "ChaCha20-Poly1305",
        }
    }

    fn key_len(self) -> usize {
        match self {
            Cipher::AesGcm128 => 16,
            Cipher::AesGcm256 | Cipher::Chacha20Poly1305 => 32,
        }
    }
}

/// One direction's keys in the layout `setsockopt(SOL_TLS, TLS_TX/TLS_RX)` takes.
pub enum CryptoInfo {
    AesGcm128(libc::tls12_crypto_info_aes_gcm_128),
    AesGcm256(libc::tls12_crypto_info_aes_gcm_256),
    Chacha20Poly1305(libc::tls12_crypto_info_chacha20_poly1305),
}

impl CryptoInfo {
    /// The kernel's form of one direction of a session: its protocol
    /// version, the next record's sequence number and the traffic keys.
    /// Err names what the kernel cannot take.
    pub fn new(version: ProtocolVersion, seq: u64, secrets: &ConnectionTrafficSecrets) -> Result<CryptoInfo, String> {
        let version = match version {
            ProtocolVersion::TLSv1_2 => libc::TLS_1_2_VERSION,
            ProtocolVersion::TLSv1_3 => libc::TLS_1_3_VERSION,
            other => return Err(format!("{other:?} is not a version kTLS carries")),
        };
        let (cipher, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Cipher::AesGcm128, key.as_ref(), iv.as_ref()),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Cipher::AesGcm256, key.as_ref(), iv.as_ref()),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (Cipher::Chacha20Poly1305, key.as_ref(), iv.as_ref())
            }
            #[allow(unreachable_patterns)] // rustls's enum is non_exhaustive
            _ => return Err("a cipher kTLS does not carry".into()),
        };
        CryptoInfo::from_parts(cipher, version, seq, key, iv)
    }

    /// Made-up TLS 1.3 keys (for the self-test: both ends of a loopback
    /// connection get them, mirrored).
    pub fn test_keys(cipher: Cipher, seed: u8) -> CryptoInfo {
        let key = [seed; 32];
        CryptoInfo::from_parts(cipher, libc::TLS_1_3_VERSION, 0, &key[..cipher.key_len()], &[seed; 12])
            .expect("sizes match the cipher")
    }

    fn from_parts(cipher: Cipher, version: u16, seq: u64, key: &[u8], iv: &[u8]) -> Result<CryptoInfo, String> {
        let rec_seq = seq.to_be_bytes();
        // rustls's 12-byte IV is the kernel's 4-byte salt then 8-byte IV
        // for AES-GCM (TLS 1.2: the implicit nonce then the first explicit
        // one; TLS 1.3: the static IV split the same way); ChaCha20 takes
        // all 12 as its IV.
        match cipher {
            Cipher::AesGcm128 => {
                let mut info = libc::tls12_crypto_info_aes_gcm_128 {
                    info: libc::tls_crypto_info { version, cipher_type: libc::TLS_CIPHER_AES_GCM_128 },
                    iv: [0; 8],
                    key: [0; 16],
                    salt: [0; 4],
                    rec_seq,
                };
                copy_exact(&mut info.key, key, "AES-128 key")?;
                split_iv(&mut info.salt, &mut info.iv, iv)?;
                Ok(CryptoInfo::AesGcm128(info))
            }
            Cipher::AesGcm256 => {
                let mut info = libc::tls12_crypto_info_aes_gcm_256 {
                    info: libc::tls_crypto_info { version, cipher_type: libc::TLS_CIPHER_AES_GCM_256 },
                    iv: [0; 8],
                    key: [0; 32],
                    salt: [0; 4],
                    rec_seq,
                };
                copy_exact(&mut info.key, key, "AES-256 key")?;
                split_iv(&mut info.salt, &mut info.iv, iv)?;
                Ok(CryptoInfo::AesGcm256(info))
            }
            Cipher::Chacha20Poly1305 => {
                let mut info = libc::tls12_crypto_info_chacha20_poly1305 {
                    info: libc::tls_crypto_info { version, cipher_type: libc::TLS_CIPHER_CHACHA20_POLY1305 },
                    iv: [0; 12],
                    key: [0; 32],
                    salt: [],
                    rec_seq,
                };
                copy_exact(&mut info.key, key, "ChaCha20 key")?;
                copy_exact(&mut info.iv, iv, "ChaCha20 IV")?;
                Ok(CryptoInfo::Chacha20Poly1305(info))
            }
        }
    }

    pub fn cipher(&self) -> Cipher {
        match self {
            CryptoInfo::AesGcm128(_) => Cipher::AesGcm128,
            CryptoInfo::AesGcm256(_) => Cipher::AesGcm256,
            CryptoInfo::Chacha20Poly1305(_) => Cipher::Chacha20Poly1305,
        }
    }

    /// Gives the socket these keys for one direction (`libc::TLS_TX` or `libc::TLS_RX`).
    pub fn install(&self, fd: RawFd, direction: libc::c_int) -> io::Result<()> {
        match self {
            CryptoInfo::AesGcm128(i) => setsockopt(fd, libc::SOL_TLS, direction, i),
            CryptoInfo::AesGcm256(i) => setsockopt(fd, libc::SOL_TLS, direction, i),
            CryptoInfo::Chacha20Poly1305(i) => setsockopt(fd, libc::SOL_TLS, direction, i),
        }
    }
}

impl Drop for CryptoInfo {
    /// Keys do not outlive their use in this process's memory.
    fn drop(&mut self) {
        fn wipe(bytes: &mut [u8]) {
            for b in bytes.iter_mut() {
                // SAFETY: `b` is a valid, aligned &mut u8; a volatile write
                // keeps the compiler from dropping a store to dying memory.
                unsafe { std::ptr::write_volatile(b, 0) };
            }
        }
        match self {
            CryptoInfo::AesGcm128(i) => (wipe(&mut i.key), wipe(&mut i.iv), wipe(&mut i.salt)),
            CryptoInfo::AesGcm256(i) => (wipe(&mut i.key), wipe(&mut i.iv), wipe(&mut i.salt)),
            CryptoInfo::Chacha20Poly1305(i) => (wipe(&mut i.key), wipe(&mut i.iv), ()),
        };
    }
}

fn copy_exact(dst: &mut [u8], src: &[u8], what: &str) -> Result<(), String> {
    if src.len() != dst.len() {
        return Err(format!("{what} of {} bytes (the kernel takes {})", src.len(), dst.len()));
    }
    dst.copy_from_slice(src);
    Ok(())
}

fn split_iv(salt: &mut [u8; 4], iv: &mut [u8; 8], from: &[u8]) -> Result<(), String> {
    if from.len() != 12 {
        return Err(format!("an AES-GCM IV of {} bytes (12 expected)", from.len()));
    }
    salt.copy_from_slice(&from[..4]);
    iv.copy_from_slice(&from[4..]);
    Ok(())
}

fn setsockopt<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` points to a live T of size_of::<T>() bytes for the
    // call; the kernel copies it and keeps no pointer.
    let rc =
        unsafe { libc::setsockopt(fd, level, name, (value as *const T).cast(), size_of::<T>() as libc::socklen_t) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Attaches the `tls` upper-layer protocol to an established TCP socket
/// (the keys come next, one direction at a time).
pub fn attach_ulp(fd: RawFd) -> io::Result<()> {
    const NAME: &[u8] = b"tls";
    // SAFETY: NAME is a live byte string of NAME.len() bytes for the call.
    let rc = unsafe {
        libc::setsockopt(fd, libc::SOL_TCP, libc::TCP_ULP, NAME.as_ptr().cast(), NAME.len() as libc::socklen_t)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Room for one control message carrying one byte (the record type).
const CMSG_SPACE: usize = 64;

/// Sends one record of `record_type` (a control record: an alert or a
/// handshake message) on a kTLS socket; never blocks. Ok(false) when the
/// socket's send buffer has no room now.
pub fn send_record(fd: RawFd, record_type: u8, payload: &[u8]) -> io::Result<bool> {
    let mut control = [0u64; CMSG_SPACE / 8];
    let mut iov = libc::iovec { iov_base: payload.as_ptr() as *mut libc::c_void, iov_len: payload.len() };
    // SAFETY: msghdr is plain data; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE computes a size; no memory is touched.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(1) } as _;
    // SAFETY: msg_control points to CMSG_SPACE(1) zeroed, 8-aligned bytes,
    // room for the one header CMSG_FIRSTHDR returns and its one data byte.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_TLS;
        (*cmsg).cmsg_type = libc::TLS_SET_RECORD_TYPE;
        (*cmsg).cmsg_len = libc::CMSG_LEN(1) as _;
        *libc::CMSG_DATA(cmsg) = record_type;
    }
    // SAFETY: msg and everything it points to are valid for the call.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if n >= 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::WouldBlock {
        Ok(false)
    } else {
        Err(e)
    }
}

/// A `close_notify` alert: the clean end of what this side sends.
pub fn send_close_notify(fd: RawFd) -> io::Result<bool> {
    send_record(fd, ALERT, &[WARNING, CLOSE_NOTIFY])
}

/// Reads one record's payload with its type (a read without room for the
/// type fails with EIO at a control record: this is how the relay reads
/// one). Never blocks: WouldBlock when no whole record is ready.
pub fn recv_record(fd: RawFd, buf: &mut [u8]) -> io::Result<(u8, usize)> {
    let mut control = [0u64; CMSG_SPACE / 8];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: msghdr is plain data; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = CMSG_SPACE as _;
    // SAFETY: msg and the buffers it points to are valid for the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut record_type = APPLICATION_DATA;
    // SAFETY: the kernel filled msg_control up to msg_controllen; the CMSG
    // macros walk only within it.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_TLS && (*cmsg).cmsg_type == libc::TLS_GET_RECORD_TYPE {
                record_type = *libc::CMSG_DATA(cmsg);
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((record_type, n as usize))
}
