//! A TLS backend for tests of TLS to backends: certificates made at test
//! time (rcgen) and a real TLS peer, a Python `ssl` server (OpenSSL) that
//! answers GETs with how many connections it accepted and which client
//! certificate it saw, and echoes WebSocket frames after an upgrade.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};

/// The backend: HTTPS with keep-alive, `accepts=N` and the client
/// certificate's CN in each answer; a WebSocket echo after an upgrade.
/// Args: cert, key, client CA ("" for none), max TLS version ("1.2" or "").
const BACKEND_PY: &str = r#"
import base64, hashlib, http.server, ssl, sys, threading, time
cert, key, client_ca, max_version = sys.argv[1:5]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
if client_ca:
    ctx.load_verify_locations(client_ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
if max_version == "1.2":
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
accepts = 0

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def do_GET(self):
        if self.headers.get("Upgrade", "").lower() == "websocket":
            return self.websocket()
        peer = self.connection.getpeercert() or {}
        cn = "-"
        for rdn in peer.get("subject", ()):
            for k, v in rdn:
                if k == "commonName":
                    cn = v
        body = f"hello over tls; accepts={accepts}; client={cn}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_POST(self):
        # A slow reader (16 KiB every 2 ms): the router's writes meet a
        # full socket, the body's last ones too.
        n = int(self.headers.get("Content-Length", "0"))
        h, left = hashlib.sha256(), n
        while left:
            chunk = self.rfile.read(min(left, 16384))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
            time.sleep(0.002)
        body = f"{n - left} {h.hexdigest()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def websocket(self):
        key = self.headers["Sec-WebSocket-Key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
        accept = base64.b64encode(hashlib.sha1(key.encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        r, w = self.rfile, self.wfile
        while True:
            head = r.read(2)
            if len(head) < 2:
                return
            op, n = head[0] & 0x0F, head[1] & 0x7F
            if n == 126:
                n = int.from_bytes(r.read(2), "big")
            elif n == 127:
                n = int.from_bytes(r.read(8), "big")
            mask = r.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(r.read(n)))
            out = bytes([0x80 | op])
            if len(data) < 126:
                out += bytes([len(data)])
            elif len(data) < 65536:
                out += bytes([126]) + len(data).to_bytes(2, "big")
            else:
                out += bytes([127]) + len(data).to_bytes(8, "big")
            w.write(out + data)
            w.flush()
            if op == 8:
                return

class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    def get_request(self):
        global accepts
        sock, addr = self.socket.accept()
        accepts += 1
        # The handshake runs in the request's thread, at its first read.
        return ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr
    def handle_error(self, request, client_address):
        pass
    def shutdown_request(self, request):
        # close_notify before FIN, as a TLS server should (without it the
        # router must take the close for a truncation).
        try:
            request.settimeout(1)
            request.unwrap()
        except Exception:
            pass
        super().shutdown_request(request)

server = Server(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

/// Certificates made at test time, in a temporary directory.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Pki {
        Pki { dir: tempfile::tempdir().unwrap() }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// A CA, written to `{name}.pem`.
    pub fn ca(&self, name: &str) -> Issuer<'static, KeyPair> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        std::fs::write(self.path(&format!("{name}.pem")), params.self_signed(&key).unwrap().pem()).unwrap();
        Issuer::new(params, key)
    }

    /// A leaf for `san` signed by `ca`, written to `{name}.pem` / `{name}.key`
    /// (a client certificate when `client`), its CN `name`.
    pub fn leaf(&self, ca: &Issuer<'_, KeyPair>, name: &str, san: &str, client: bool) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![san.to_string()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.extended_key_usages =
            vec![if client { ExtendedKeyUsagePurpose::ClientAuth } else { ExtendedKeyUsagePurpose::ServerAuth }];
        std::fs::write(self.path(&format!("{name}.pem")), params.signed_by(&key, ca).unwrap().pem()).unwrap();
        std::fs::write(self.path(&format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

/// The Python TLS backend, killed when dropped.
pub struct TlsBackend {
    child: Child,
    pub addr: SocketAddr,
}

impl TlsBackend {
    /// Serves `{leaf}.pem`; requires a client certificate signed by
    /// `client_ca` when given; at most TLS 1.2 when `tls12`.
    pub fn start(pki: &Pki, leaf: &str, client_ca: Option<&str>, tls12: bool) -> TlsBackend {
        let script = pki.path("backend.py");
        std::fs::write(&script, BACKEND_PY).unwrap();
        let mut child = Command::new("python3")
            .arg(&script)
            .arg(pki.path(&format!("{leaf}.pem")))
            .arg(pki.path(&format!("{leaf}.key")))
            .arg(client_ca.map(|ca| pki.path(&format!("{ca}.pem"))).unwrap_or_default())
            .arg(if tls12 { "1.2" } else { "" })
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port: u16 = line.trim().parse().unwrap_or_else(|_| panic!("backend printed {line:?}"));
        TlsBackend { child, addr: SocketAddr::from(([127, 0, 0, 1], port)) }
    }
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
