//! TLS for the MQTTS and WSS listeners: the rustls server configuration read from PEM files
//! (with client certificates required and verified when a client CA is given), and the
//! per-connection handshake that also reads the client certificate's common name. The server's
//! own certificate and key can be read again while it runs (SIGHUP).

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tokio::net::TcpStream;
use tokio_rustls::rustls::crypto::ring::sign::any_supported_type;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::HandshakeError;
use crate::session::limits::ConnectionInfo;

/// A TLS file the adapter cannot use; the message names the variable and the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("{var}: cannot read {path}: {source}")]
    Read {
        var: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{var}: {path} holds no {what} in PEM format")]
    Empty {
        var: &'static str,
        path: PathBuf,
        what: &'static str,
    },
    #[error("SMQ_MQTT_ADAPTER_CLIENT_CA_CERTS: {0}")]
    ClientCa(String),
    #[error("SMQ_MQTT_ADAPTER_SERVER_CERT / _SERVER_KEY: {0}")]
    KeyPair(String),
    #[error("SMQ_MQTT_ADAPTER_SERVER_CERT and SMQ_MQTT_ADAPTER_SERVER_KEY must be set together")]
    Incomplete,
}

/// The server's certificate chain and key, read again from their files on [`reload`]: new
/// handshakes use the new pair, established sessions keep theirs.
///
/// [`reload`]: ServerIdentity::reload
#[derive(Debug)]
pub struct ServerIdentity {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ServerIdentity {
    fn read(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsConfigError> {
        let chain = read_certs("SMQ_MQTT_ADAPTER_SERVER_CERT", cert)?;
        let key = read_key(key)?;
        let signing =
            any_supported_type(&key).map_err(|e| TlsConfigError::KeyPair(e.to_string()))?;
        Ok(Arc::new(CertifiedKey::new(chain, signing)))
    }

    /// Reads the files again; a pair that cannot be used is refused and the old one stays.
    pub fn reload(&self) -> Result<(), TlsConfigError> {
        let fresh = Self::read(&self.cert, &self.key)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }
}

impl ResolvesServerCert for ServerIdentity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

/// Builds the acceptor from the server certificate chain and key; with `client_ca`, every client
/// must present a certificate signed by it (mTLS). The identity it returns reloads the pair.
pub fn acceptor(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<(TlsAcceptor, Arc<ServerIdentity>), TlsConfigError> {
    let identity = Arc::new(ServerIdentity {
        cert: cert.to_owned(),
        key: key.to_owned(),
        current: RwLock::new(ServerIdentity::read(cert, key)?),
    });
    let builder = ServerConfig::builder();
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for ca in read_certs("SMQ_MQTT_ADAPTER_CLIENT_CA_CERTS", path)? {
                roots
                    .add(ca)
                    .map_err(|e| TlsConfigError::ClientCa(format!("{}: {e}", path.display())))?;
            }
            let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .map_err(|e| TlsConfigError::ClientCa(format!("{}: {e}", path.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_cert_resolver(identity.clone());
    Ok((TlsAcceptor::from(Arc::new(config)), identity))
}

fn open(var: &'static str, path: &Path) -> Result<BufReader<File>, TlsConfigError> {
    File::open(path)
        .map(BufReader::new)
        .map_err(|source| TlsConfigError::Read {
            var,
            path: path.to_owned(),
            source,
        })
}

fn read_certs(
    var: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let certs = rustls_pemfile::certs(&mut open(var, path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsConfigError::Read {
            var,
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsConfigError::Empty {
            var,
            path: path.to_owned(),
            what: "certificate",
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    const VAR: &str = "SMQ_MQTT_ADAPTER_SERVER_KEY";
    rustls_pemfile::private_key(&mut open(VAR, path)?)
        .map_err(|source| TlsConfigError::Read {
            var: VAR,
            path: path.to_owned(),
            source,
        })?
        .ok_or_else(|| TlsConfigError::Empty {
            var: VAR,
            path: path.to_owned(),
            what: "private key",
        })
}

/// The TLS handshake of one connection; the caller bounds it with the handshake timeout.
pub async fn accept(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    listener: &'static str,
) -> Result<(TlsStream<TcpStream>, ConnectionInfo), HandshakeError> {
    let tls = acceptor
        .accept(stream)
        .await
        .map_err(|e| HandshakeError(format!("TLS: {e}")))?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first());
    let conn = ConnectionInfo {
        listener,
        client_certificate: leaf.is_some(),
        cert_common_name: leaf.and_then(|cert| common_name(cert)),
        connect_deadline: None,
        connect_budget: None,
    };
    Ok((tls, conn))
}

/// The subject common name of a DER certificate.
fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}
