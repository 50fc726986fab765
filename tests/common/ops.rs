//! Operations helpers: a minimal HTTP/1.1 GET for `/health` and `/metrics`, reading one sample out
//! of the Prometheus text, and a throw-away PKI (CA, server and client certificates made with rcgen
//! into a temp dir) for the TLS tests.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::adapter::WAIT;

/// `GET path` on 127.0.0.1:`port`; returns the status code and body, or why it failed.
pub async fn try_http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let text = String::from_utf8(raw).map_err(|e| format!("not UTF-8: {e}"))?;
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("no header end in {text:?}"))?;
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no status in {head:?}"))?;
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)?
        } else {
            body.to_owned()
        };
        Ok((status, body))
    };
    tokio::time::timeout(WAIT, exchange)
        .await
        .map_err(|_| "no HTTP answer within the wait".to_string())?
}

/// [`try_http_get`] that panics on failure.
pub async fn http_get(port: u16, path: &str) -> (u16, String) {
    try_http_get(port, path)
        .await
        .unwrap_or_else(|e| panic!("GET {path} on port {port}: {e}"))
}

fn dechunk(mut body: &str) -> Result<String, String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body
            .split_once("\r\n")
            .ok_or_else(|| "bad chunk header".to_string())?;
        let size = usize::from_str_radix(size.trim(), 16).map_err(|e| e.to_string())?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(rest.get(..size).ok_or("short chunk")?);
        body = rest.get(size + 2..).ok_or("short chunk")?;
    }
}

/// The value of the sample written exactly as `series` (e.g. `mqtt_adapter_messages_total{direction="in"}`),
/// or `None` if the exposition has no such line.
pub fn metric(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

/// A CA with a server certificate for localhost/127.0.0.1, able to issue client certificates.
pub struct TestPki {
    dir: PathBuf,
    name: String,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
    pub ca_pem: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl TestPki {
    /// Makes the CA (named `name`) and the server certificate under `dir`.
    pub fn new(dir: &Path, name: &str) -> TestPki {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        let ca_key = KeyPair::generate().expect("CA key");
        let ca = params.self_signed(&ca_key).expect("self-sign CA");
        let ca_pem = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&ca_pem, ca.pem()).expect("write CA");
        let mut pki = TestPki {
            dir: dir.to_owned(),
            name: name.to_owned(),
            ca,
            ca_key,
            ca_pem,
            server_cert: PathBuf::new(),
            server_key: PathBuf::new(),
        };
        let (cert, key) = pki.issue("localhost", ExtendedKeyUsagePurpose::ServerAuth);
        pki.server_cert = cert;
        pki.server_key = key;
        pki
    }

    /// A client certificate with common name `cn`: (certificate PEM path, key PEM path).
    pub fn client(&self, cn: &str) -> (PathBuf, PathBuf) {
        self.issue(cn, ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(&self, cn: &str, usage: ExtendedKeyUsagePurpose) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        params.subject_alt_names = vec![
            SanType::DnsName("localhost".try_into().expect("DNS name")),
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        ];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.ca, &self.ca_key)
            .expect("sign leaf");
        let cert_path = self.dir.join(format!("{}-{cn}.pem", self.name));
        let key_path = self.dir.join(format!("{}-{cn}.key", self.name));
        std::fs::write(&cert_path, cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        (cert_path, key_path)
    }

    /// The environment that serves TLS with this PKI's server certificate; with `mtls`, clients
    /// must present a certificate from this CA.
    pub fn env(&self, mtls: bool) -> Vec<(String, String)> {
        let mut env = vec![
            (
                "SMQ_MQTT_ADAPTER_SERVER_CERT".into(),
                path(&self.server_cert),
            ),
            ("SMQ_MQTT_ADAPTER_SERVER_KEY".into(), path(&self.server_key)),
        ];
        if mtls {
            env.push((
                "SMQ_MQTT_ADAPTER_CLIENT_CA_CERTS".into(),
                path(&self.ca_pem),
            ));
        }
        env
    }
}

fn path(p: &Path) -> String {
    p.to_str().expect("UTF-8 temp path").to_owned()
}
