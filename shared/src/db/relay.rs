//! A relay that lets libpq tools (`pg_dump`, `pg_dumpall`) reach the server through
//! Tidemark's own connection settings.
//!
//! The tool connects to a Unix socket in a private (0700) directory; for each connection
//! the relay opens the server connection exactly as [`super::connect`] would — TCP, the
//! `SSLRequest`, TLS through native-tls with the same sslmode and CA bundle — and then
//! pipes bytes both ways. So TLS is verified the same way for every connection Tidemark
//! makes, and a pg_dump built without TLS (the Lambda layer's) can dump a TLS-only server.
//!
//! One message is rewritten: the server's `AuthenticationSASL` offer loses
//! `SCRAM-SHA-256-PLUS`. libpq refuses a channel-binding offer on a connection it believes
//! is plain (the Unix socket); the relay's own certificate verification is what protects
//! the exchange. Relay failures (server unreachable, certificate refused) are sent to the
//! tool as an error message and kept for [`Relay::failure`], so Tidemark can report the
//! cause itself.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio::task::JoinHandle;

use super::{DbError, DbSettings, SslMode};

const SSL_REQUEST: i32 = 80_877_103;
const GSSENC_REQUEST: i32 = 80_877_104;
const CANCEL_REQUEST: i32 = 80_877_102;
/// Largest startup or authentication message the relay accepts.
const MAX_MESSAGE: usize = 1 << 20;

trait Duplex: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Duplex for T {}

/// A running relay; stops (and removes its socket directory) when dropped.
#[derive(Debug)]
pub struct Relay {
    dir: tempfile::TempDir,
    port: u16,
    accept: JoinHandle<()>,
    failure: Arc<Mutex<Option<String>>>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Relay {
    /// Starts a relay to the server `settings` names.
    ///
    /// # Errors
    /// [`DbError::InvalidSettings`] when the socket directory cannot be made, TLS setup
    /// errors (a bad CA file).
    pub async fn start(settings: &DbSettings) -> Result<Relay, DbError> {
        let io = |what: &str, e: std::io::Error| {
            DbError::InvalidSettings(format!("starting the pg_dump relay: {what}: {e}"))
        };
        let dir = tempfile::Builder::new()
            .prefix("tidemark-relay-")
            .tempdir()
            .map_err(|e| io("creating its directory", e))?;
        set_private(dir.path(), 0o700).map_err(|e| io("securing its directory", e))?;
        let port = settings.port;
        let listener = UnixListener::bind(dir.path().join(format!(".s.PGSQL.{port}")))
            .map_err(|e| io("binding its socket", e))?;
        let tls = match settings.sslmode {
            SslMode::Disable => None,
            _ => Some(tokio_native_tls::TlsConnector::from(super::tls_connector(
                settings,
            )?)),
        };
        let upstream = Arc::new(Upstream {
            settings: settings.clone(),
            tls,
        });
        let failure = Arc::new(Mutex::new(None));
        let slot = failure.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let slot = slot.clone();
                tokio::spawn(async move {
                    if let Err(message) = upstream.relay(client).await {
                        tracing::debug!(error = %message, "pg_dump relay connection failed");
                        if let Ok(mut slot) = slot.lock() {
                            slot.get_or_insert(message);
                        }
                    }
                });
            }
        });
        Ok(Relay {
            dir,
            port,
            accept,
            failure,
        })
    }

    /// The directory holding the socket: the tool's `PGHOST`.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The tool's `PGPORT` (the socket is `.s.PGSQL.<port>`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A private file in the relay's directory (mode 0600), e.g. the tool's `PGPASSFILE`.
    ///
    /// # Errors
    /// I/O errors writing it.
    pub fn private_file(&self, name: &str, contents: &[u8]) -> std::io::Result<PathBuf> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.dir.path().join(name);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        file.write_all(contents)?;
        Ok(path)
    }

    /// The first failure of the relay itself (not of the tool's session), if any.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }
}

fn set_private(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

struct Upstream {
    settings: DbSettings,
    tls: Option<tokio_native_tls::TlsConnector>,
}

impl Upstream {
    /// Serves one client connection; the error is the relay's own failure.
    async fn relay(&self, mut client: UnixStream) -> Result<(), String> {
        let first = loop {
            let packet = read_startup(&mut client)
                .await
                .map_err(|e| format!("reading the client's startup packet: {e}"))?;
            match packet_code(&packet) {
                // The tool asks for TLS or GSS on its side: no, the relay does TLS.
                SSL_REQUEST | GSSENC_REQUEST => client
                    .write_all(b"N")
                    .await
                    .map_err(|e| format!("answering the client: {e}"))?,
                _ => break packet,
            }
        };
        let mut server = match self.connect().await {
            Ok(server) => server,
            Err(message) => {
                let _ = client.write_all(&error_response(&message)).await;
                return Err(message);
            }
        };
        server
            .write_all(&first)
            .await
            .map_err(|e| format!("forwarding the startup packet: {e}"))?;
        if packet_code(&first) == CANCEL_REQUEST {
            let _ = server.shutdown().await;
            return Ok(());
        }
        let (mut server_read, mut server_write) = tokio::io::split(server);
        let (mut client_read, mut client_write) = client.into_split();
        let to_server = tokio::spawn(async move {
            let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
            let _ = server_write.shutdown().await;
        });
        // Until authentication is done, read message by message to adjust the SASL offer.
        loop {
            let Some((tag, body)) = read_message(&mut server_read).await else {
                to_server.abort();
                return Ok(());
            };
            let body = if tag == b'R' && auth_code(&body) == Some(10) {
                without_channel_binding(&body)
            } else {
                body
            };
            let mut message = Vec::with_capacity(body.len() + 5);
            message.push(tag);
            message.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
            message.extend_from_slice(&body);
            if client_write.write_all(&message).await.is_err() {
                to_server.abort();
                return Ok(());
            }
            if tag == b'R' && auth_code(&body) == Some(0) {
                break;
            }
        }
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
        let _ = to_server.await;
        Ok(())
    }

    /// Opens the server connection the way Tidemark's own sessions do.
    async fn connect(&self) -> Result<Box<dyn Duplex>, String> {
        let s = &self.settings;
        let target = s.to_string();
        let fail = |detail: String| format!("tidemark relay: cannot connect to {target}: {detail}");
        if s.host.starts_with('/') {
            let path = format!("{}/.s.PGSQL.{}", s.host, s.port);
            let stream = UnixStream::connect(&path)
                .await
                .map_err(|e| fail(e.to_string()))?;
            return Ok(Box::new(stream));
        }
        let tcp = tokio::time::timeout(
            s.connect_timeout,
            TcpStream::connect((s.host.as_str(), s.port)),
        )
        .await
        .map_err(|_| fail(format!("timed out after {:?}", s.connect_timeout)))?
        .map_err(|e| fail(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let Some(tls) = &self.tls else {
            return Ok(Box::new(tcp));
        };
        let mut tcp = tcp;
        let mut request = Vec::with_capacity(8);
        request.extend_from_slice(&8i32.to_be_bytes());
        request.extend_from_slice(&SSL_REQUEST.to_be_bytes());
        tcp.write_all(&request)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer)
            .await
            .map_err(|e| fail(e.to_string()))?;
        match answer[0] {
            b'S' => {
                let stream = tls.connect(&s.host, tcp).await.map_err(|e| {
                    fail(format!(
                        "error performing TLS handshake: {}",
                        crate::error_chain(&e)
                    ))
                })?;
                Ok(Box::new(stream))
            }
            b'N' if s.sslmode == SslMode::Prefer => Ok(Box::new(tcp)),
            b'N' => Err(fail(format!(
                "server does not support TLS, but sslmode is {}",
                s.sslmode
            ))),
            other => Err(fail(format!(
                "unexpected answer {other:#04x} to the TLS request"
            ))),
        }
    }
}

fn packet_code(packet: &[u8]) -> i32 {
    packet
        .get(4..8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, i32::from_be_bytes)
}

fn auth_code(body: &[u8]) -> Option<i32> {
    body.get(..4)
        .and_then(|b| b.try_into().ok())
        .map(i32::from_be_bytes)
}

/// A startup-phase packet: length (itself included) then payload; returned whole.
async fn read_startup(stream: &mut UnixStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await?;
    let len = i32::from_be_bytes(len);
    if !(8..=MAX_MESSAGE as i32).contains(&len) {
        return Err(std::io::Error::other(format!("bad packet length {len}")));
    }
    let mut packet = vec![0u8; len as usize];
    packet[..4].copy_from_slice(&len.to_be_bytes());
    stream.read_exact(&mut packet[4..]).await?;
    Ok(packet)
}

/// One regular message (tag, body); `None` when the stream ends or is malformed.
async fn read_message<R: AsyncRead + Unpin>(stream: &mut R) -> Option<(u8, Vec<u8>)> {
    let mut header = [0u8; 5];
    stream.read_exact(&mut header).await.ok()?;
    let len = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    if !(4..=MAX_MESSAGE as i32).contains(&len) {
        return None;
    }
    let mut body = vec![0u8; len as usize - 4];
    stream.read_exact(&mut body).await.ok()?;
    Some((header[0], body))
}

/// The `AuthenticationSASL` body with the `-PLUS` (channel binding) mechanisms removed.
fn without_channel_binding(body: &[u8]) -> Vec<u8> {
    let mut out = body[..4].to_vec();
    for mechanism in body[4..].split(|&b| b == 0).filter(|m| !m.is_empty()) {
        if !mechanism.ends_with(b"-PLUS") {
            out.extend_from_slice(mechanism);
            out.push(0);
        }
    }
    out.push(0);
    out
}

/// A FATAL `ErrorResponse` carrying `message`, for the tool to print.
fn error_response(message: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (field, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', "08001"),
        (b'M', message),
    ] {
        body.push(field);
        body.extend_from_slice(value.replace('\0', " ").as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = vec![b'E'];
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sasl_offer_loses_channel_binding_only() {
        let mut body = 10i32.to_be_bytes().to_vec();
        body.extend_from_slice(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
        let mut expected = 10i32.to_be_bytes().to_vec();
        expected.extend_from_slice(b"SCRAM-SHA-256\0\0");
        assert_eq!(without_channel_binding(&body), expected);
    }

    #[test]
    fn error_responses_are_well_formed() {
        let e = error_response("no\0way");
        assert_eq!(e[0], b'E');
        let len = i32::from_be_bytes([e[1], e[2], e[3], e[4]]) as usize;
        assert_eq!(len + 1, e.len());
        assert!(e.ends_with(b"Mno way\0\0"));
    }
}
