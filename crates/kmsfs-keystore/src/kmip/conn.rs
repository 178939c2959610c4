//! Mutual-TLS connections to a KMIP server and request/response exchange.
//!
//! TLS is rustls (TLS 1.3 or 1.2; nothing older), verifying the server's
//! certificate against the configured CA only (no system roots: a KMIP
//! server's CA is the organisation's own) and its name or IP address
//! against the `HOST` of `HOST:PORT`. The client presents its certificate
//! and key; the key file must pass the same checks as a token file (mode
//! 0600, owner root or the caller, no symbolic link).
//!
//! Requests and responses are held in locked, zeroized memory
//! ([`SecretBytes`]). rustls copies application data into its own record
//! buffers, which it does not zeroize; those copies are outside kmsfs'
//! control, like the HTTP buffers of the Vault client.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use kmsfs_core::secret::SecretBytes;
use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use zeroize::Zeroize as _;

use super::message::{self, Operation, ProtocolVersion, Request};
use super::ttlv;
use crate::error::KmsError;
use crate::secret_file::read_secret_file;

/// Largest response accepted (real ones are well under 4 KiB).
const MAX_RESPONSE: usize = 1024 * 1024;

/// Reads every certificate of a PEM file.
pub(crate) fn read_certs(
    path: &Path,
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, KmsError> {
    let pem = fs::read(path).map_err(|e| KmsError::Tls {
        detail: format!("cannot read the {what} {}: {e}", path.display()),
    })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| KmsError::Tls {
            detail: format!(
                "{}: not a PEM certificate file ({what}): {e}",
                path.display()
            ),
        })?;
    if certs.is_empty() {
        return Err(KmsError::Tls {
            detail: format!(
                "{}: no PEM certificate (BEGIN CERTIFICATE) found in the {what}",
                path.display()
            ),
        });
    }
    Ok(certs)
}

/// Presents one fixed client certificate.
#[derive(Debug)]
struct FixedClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for FixedClientCert {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// Builds the rustls configuration: the CA that signed the server's
/// certificate, and the client certificate and key for mutual TLS.
pub(crate) fn tls_config(
    ca_cert: &Path,
    client_cert: &Path,
    client_key: &Path,
) -> Result<Arc<rustls::ClientConfig>, KmsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in read_certs(ca_cert, "CA certificate")? {
        roots.add(c).map_err(|e| KmsError::Tls {
            detail: format!("{}: unusable CA certificate: {e}", ca_cert.display()),
        })?;
    }
    let chain = read_certs(client_cert, "client certificate")?;
    // Checked like a token file (0600, owner, no symlink), read into locked memory.
    let key_pem = read_secret_file(client_key, false)?;
    let mut key_der =
        PrivateKeyDer::from_pem_slice(key_pem.expose()).map_err(|e| KmsError::Tls {
            detail: format!(
                "{}: no usable private key (PKCS#8, SEC1 or PKCS#1 PEM): {e}",
                client_key.display()
            ),
        })?;
    // The signing key is built from a borrowed DER so this copy can be
    // wiped; rustls' own loader would drop it unwiped.
    let signer = rustls::crypto::ring::sign::any_supported_type(&key_der);
    key_der.zeroize();
    let signer = signer.map_err(|e| KmsError::Tls {
        detail: format!(
            "{}: unsupported client key type (use ECDSA P-256/P-384, Ed25519 or RSA): {e}",
            client_key.display()
        ),
    })?;
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match().map_err(|e| KmsError::Tls {
        detail: format!(
            "{} does not belong to the certificate {}: {e}",
            client_key.display(),
            client_cert.display()
        ),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| KmsError::Tls {
            detail: format!("cannot set up TLS: {e}"),
        })?
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(FixedClientCert(Arc::new(certified))));
    Ok(Arc::new(config))
}

/// How one attempt at one address failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The address did not answer usefully (refused, reset, timed out,
    /// closed): try the next one.
    Transport(String),
    /// A definite answer that another address would repeat (TLS refusal,
    /// KMIP error, malformed reply): stop.
    Fatal(KmsError),
}

impl From<KmsError> for Failure {
    fn from(e: KmsError) -> Self {
        Failure::Fatal(e)
    }
}

/// An open, version-negotiated connection to one server.
pub(crate) struct Session {
    stream: TlsStream<TcpStream>,
    /// `HOST:PORT` of the server.
    pub address: String,
    /// The protocol version both sides speak.
    pub version: ProtocolVersion,
    deadline: Instant,
}

/// Splits `HOST:PORT` (IPv6 hosts in brackets) into the TLS server name
/// and the port.
pub(crate) fn split_address(address: &str) -> Result<(String, u16), String> {
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| format!("'{address}' is not HOST:PORT"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("'{address}': port '{port}' is not a number from 1 to 65535"))?;
    let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => {
            v6.parse::<std::net::Ipv6Addr>()
                .map_err(|_| format!("'{address}': '{v6}' is not an IPv6 address"))?;
            v6.to_string()
        }
        None if host.contains(':') => {
            return Err(format!(
                "'{address}': write an IPv6 address in brackets, [ADDR]:PORT"
            ))
        }
        None => host.to_string(),
    };
    ServerName::try_from(host.clone())
        .map_err(|_| format!("'{address}': '{host}' is not a valid host name or IP address"))?;
    Ok((host, port))
}

/// What a TLS handshake error means, from the error's type (never its text).
fn tls_failure(address: &str, e: std::io::Error) -> Failure {
    if let Some(err) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        let hint = match err {
            rustls::Error::InvalidCertificate(_) => {
                "the server's certificate is not valid for this CA and address (check `ca_cert` \
                 and that the certificate names the host or IP you configured)"
            }
            rustls::Error::AlertReceived(
                rustls::AlertDescription::UnknownCA
                | rustls::AlertDescription::BadCertificate
                | rustls::AlertDescription::CertificateUnknown
                | rustls::AlertDescription::UnsupportedCertificate
                | rustls::AlertDescription::CertificateRevoked
                | rustls::AlertDescription::CertificateExpired
                | rustls::AlertDescription::AccessDenied
                | rustls::AlertDescription::CertificateRequired,
            ) => {
                "the server refused the client certificate (check that `client_cert` is signed \
                 by a CA the KMIP server trusts and has not expired)"
            }
            rustls::Error::AlertReceived(_) | rustls::Error::PeerIncompatible(_) => {
                "the server and kmsfs share no TLS version or cipher suite (kmsfs needs TLS 1.2 or \
                 1.3 with an ECDHE AES-GCM or ChaCha20 suite)"
            }
            _ => "TLS handshake failed",
        };
        return Failure::Fatal(KmsError::Tls {
            detail: format!("{address}: {err}: {hint}"),
        });
    }
    match e.kind() {
        // A server that drops the connection during the handshake has most
        // likely refused the client certificate without an alert.
        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => {
            Failure::Transport(format!(
                "{address}: the server closed the connection during the TLS handshake \
                 (refused client certificate, or not a TLS server?)"
            ))
        }
        _ => Failure::Transport(format!("{address}: TLS handshake: {e}")),
    }
}

/// Maps an I/O error after the handshake: the TLS layer reports alerts
/// and bad records as `rustls::Error`, anything else is the connection.
fn io_failure(address: &str, what: &str, e: std::io::Error) -> Failure {
    if let Some(err) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        if let rustls::Error::AlertReceived(_) = err {
            return tls_failure(address, e);
        }
        return Failure::Fatal(KmsError::Tls {
            detail: format!("{address}: {what}: {err}"),
        });
    }
    Failure::Transport(format!("{address}: {what}: {e}"))
}

impl Session {
    /// Connects to `address`, completes the TLS handshake and negotiates
    /// the protocol version, all before `deadline`.
    pub async fn open(
        address: &str,
        tls: &Arc<rustls::ClientConfig>,
        deadline: Instant,
    ) -> Result<Session, Failure> {
        let (host, port) =
            split_address(address).map_err(|detail| Failure::Fatal(KmsError::Config { detail }))?;
        let name = ServerName::try_from(host.clone()).map_err(|_| {
            Failure::Fatal(KmsError::Config {
                detail: format!("'{host}' is not a valid host name or IP address"),
            })
        })?;
        let timed_out = || Failure::Transport(format!("{address}: no answer before the deadline"));
        let tcp = tokio::time::timeout_at(deadline, TcpStream::connect((host.as_str(), port)))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| Failure::Transport(format!("{address}: cannot connect: {e}")))?;
        tcp.set_nodelay(true).ok();
        let connector = tokio_rustls::TlsConnector::from(tls.clone());
        let stream = tokio::time::timeout_at(deadline, connector.connect(name, tcp))
            .await
            .map_err(|_| timed_out())?
            .map_err(|e| tls_failure(address, e))?;
        let mut session = Session {
            stream,
            address: address.to_string(),
            version: ProtocolVersion::V1_2,
            deadline,
        };
        session.version = session.negotiate().await?;
        Ok(session)
    }

    /// Moves the deadline (once connected, the operation may use all of
    /// the time left, not just this address's share).
    pub fn extend_deadline(&mut self, deadline: Instant) {
        self.deadline = deadline;
    }

    /// Discover Versions: the newest of 1.4, 1.3 and 1.2 the server speaks.
    async fn negotiate(&mut self) -> Result<ProtocolVersion, Failure> {
        let reply = self
            .exchange(
                Operation::DiscoverVersions,
                message::discover_versions_payload(),
            )
            .await?;
        let payload = self.success(&reply, Operation::DiscoverVersions)?;
        let versions = message::parse_discover_versions(&payload)
            .map_err(|e| self.malformed(Operation::DiscoverVersions, e))?;
        versions
            .into_iter()
            .find(|v| ProtocolVersion::OFFERED.contains(v))
            .ok_or_else(|| {
                Failure::Fatal(KmsError::Protocol {
                    path: format!("{} Discover Versions", self.address),
                    detail: "the server speaks none of KMIP 1.4, 1.3 and 1.2 (kmsfs needs 1.2 or \
                             newer for Encrypt and Decrypt)"
                        .into(),
                })
            })
    }

    /// Sends one request and reads the raw reply into locked memory.
    pub async fn exchange(
        &mut self,
        operation: Operation,
        payload: Vec<ttlv::Item<'_>>,
    ) -> Result<SecretBytes, Failure> {
        let request = message::encode_request(&Request {
            version: self.version,
            operation,
            payload,
        })
        .map_err(|e| {
            Failure::Fatal(KmsError::Protocol {
                path: operation.name().into(),
                detail: format!("cannot encode the request: {e}"),
            })
        })?;
        let address = self.address.clone();
        let deadline = self.deadline;
        let timed_out = || {
            Failure::Transport(format!(
                "{address}: no answer to {} before the deadline",
                operation.name()
            ))
        };
        let io = async {
            self.stream
                .write_all(request.expose())
                .await
                .map_err(|e| io_failure(&address, "sending the request", e))?;
            self.stream
                .flush()
                .await
                .map_err(|e| io_failure(&address, "sending the request", e))?;
            let mut header = [0u8; ttlv::HEADER_LEN];
            self.stream
                .read_exact(&mut header)
                .await
                .map_err(|e| io_failure(&address, "reading the reply", e))?;
            let total = ttlv::message_len(&header, MAX_RESPONSE).map_err(|e| {
                Failure::Fatal(KmsError::Protocol {
                    path: format!("{address} {}", operation.name()),
                    detail: e.to_string(),
                })
            })?;
            let mut reply = SecretBytes::zeroed(total);
            reply.expose_mut()[..ttlv::HEADER_LEN].copy_from_slice(&header);
            self.stream
                .read_exact(&mut reply.expose_mut()[ttlv::HEADER_LEN..])
                .await
                .map_err(|e| io_failure(&address, "reading the reply", e))?;
            Ok(reply)
        };
        tokio::time::timeout_at(deadline, io)
            .await
            .map_err(|_| timed_out())?
    }

    /// The payload of a successful reply, or the server's refusal as a
    /// [`KmsError::KmipFailure`].
    pub fn success<'a>(
        &self,
        reply: &'a SecretBytes,
        operation: Operation,
    ) -> Result<ttlv::Item<'a>, Failure> {
        let response = message::parse_response(reply.expose(), operation)
            .map_err(|e| self.malformed(operation, e))?;
        match response.outcome {
            message::Outcome::Success(p) => Ok(p),
            message::Outcome::Failure {
                status,
                reason,
                message,
            } => Err(Failure::Fatal(KmsError::KmipFailure {
                address: self.address.clone(),
                operation: operation.name(),
                reason,
                detail: format!(
                    "{}{}{}",
                    reason
                        .map(message::result_reason_name)
                        .unwrap_or(match status {
                            2 => "Operation Pending",
                            3 => "Operation Undone",
                            _ => "Operation Failed",
                        }),
                    if message.is_some() { ": " } else { "" },
                    message.unwrap_or_default()
                ),
            })),
        }
    }

    /// A reply that does not decode or has the wrong shape.
    pub fn malformed(&self, operation: Operation, e: ttlv::TtlvError) -> Failure {
        Failure::Fatal(KmsError::Protocol {
            path: format!("{} {}", self.address, operation.name()),
            detail: e.to_string(),
        })
    }

    /// Closes the TLS session politely (best effort; the server may be gone).
    pub async fn close(mut self) {
        let _ = tokio::time::timeout_at(self.deadline, self.stream.shutdown()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            split_address("kms.example:5696").unwrap(),
            ("kms.example".into(), 5696)
        );
        assert_eq!(
            split_address("127.0.0.1:1").unwrap(),
            ("127.0.0.1".into(), 1)
        );
        assert_eq!(split_address("[::1]:5696").unwrap(), ("::1".into(), 5696));
        for bad in [
            "kms",
            "kms:0",
            "kms:65536",
            "kms:x",
            "::1:5696",
            "[zz]:5696",
            ":5696",
            "https://kms:5696",
        ] {
            assert!(split_address(bad).is_err(), "accepted {bad}");
        }
    }
}
