//! warren's own TLS 1.3 record layer for established sessions.
//!
//! rustls runs the handshake; once it is over (and the handshake messages have all been read,
//! see [`crate::transport::SessionIo`]), the session's traffic keys are taken out of rustls
//! (`dangerous_extract_secrets`, the hand-over kernel TLS uses) and the data plane seals and
//! opens the application-data records itself, with ring's AEADs, as RFC 8446 section 5.2
//! defines them. The point is copies: rustls's buffered API copies every byte twice on the way
//! out (into its record, then out of its queue to the caller) and three times on the way in
//! (into its deframer, into a plaintext chunk, out to the caller), and zero-fills its deframer
//! buffer. Here a record is written straight into the caller's output buffer and sealed in
//! place (one copy); a received record that arrives whole in one read is copied once, into the
//! caller's plaintext buffer, and opened in place there (two copies when it spans reads).
//!
//! What it does not do, and what happens instead:
//! - Key updates: neither warren end asks for one. A peer that sends `KeyUpdate` ends the
//!   session with an error naming it; the client reconnects with fresh keys.
//! - The AEAD's confidentiality limit (2^24 records for AES-GCM in rustls, about 256 GiB): the
//!   session ends with an error before its sending key reaches it, and the client reconnects.
//! - Session tickets: the server never sends one after the hand-over (rustls sends its tickets
//!   during the handshake); one that arrives whole in a record is ignored.
//! - Only TLS 1.3 with AES-128-GCM, AES-256-GCM or ChaCha20-Poly1305; anything else stays on
//!   rustls ([`Tls13Records::can_take_over`] says why).

use std::io;

use bytes::{BufMut, BytesMut};
use ring::aead;
use rustls::{ConnectionTrafficSecrets, ProtocolVersion, SupportedCipherSuite};

use crate::transport::TlsConn;

/// Record header: content type, legacy version (2), length (2).
pub const HEADER_LEN: usize = 5;
/// Largest plaintext per record (2^14).
pub const MAX_PLAIN: usize = 1 << 14;
/// Largest `length` a TLS 1.3 record may carry (2^14 + 256).
const MAX_CIPHER: usize = MAX_PLAIN + 256;
const TAG_LEN: usize = 16;
/// What a sealed record adds to its plaintext: header, inner content type, tag.
pub const OVERHEAD: usize = HEADER_LEN + 1 + TAG_LEN;

const CT_CHANGE_CIPHER_SPEC: u8 = 20;
const CT_ALERT: u8 = 21;
const CT_HANDSHAKE: u8 = 22;
const CT_APPLICATION_DATA: u8 = 23;
const HS_NEW_SESSION_TICKET: u8 = 4;
const HS_KEY_UPDATE: u8 = 24;
const ALERT_CLOSE_NOTIFY: u8 = 0;

/// Where sealed records go: the data planes' output buffers (`Vec<u8>` on io_uring,
/// `BytesMut` in the portable `SessionIo`). Appended to, then sealed in place.
pub trait RecordOut: BufMut + AsMut<[u8]> {}
impl<T: BufMut + AsMut<[u8]>> RecordOut for T {}

/// One direction's key, IV and record sequence number.
struct Keys {
    key: aead::LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl Keys {
    fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> Result<Keys, String> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err("an AEAD this record layer does not implement".into()),
        };
        let key = aead::UnboundKey::new(alg, key.as_ref())
            .map_err(|_| "the extracted key does not fit its AEAD".to_string())?;
        let iv: [u8; 12] = iv
            .as_ref()
            .try_into()
            .map_err(|_| "the extracted IV is not 12 bytes".to_string())?;
        Ok(Keys {
            key: aead::LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The per-record nonce (RFC 8446 5.3): the IV XOR the sequence number, then the next one.
    fn next_nonce(&mut self) -> aead::Nonce {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq += 1;
        aead::Nonce::assume_unique_for_key(n)
    }
}

fn bad_data(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// The record layer of one TLS 1.3 session after its handshake. See the module docs.
pub struct Tls13Records {
    tx: Keys,
    rx: Keys,
    /// Records a key may seal before the session must end (the suite's confidentiality limit).
    tx_limit: u64,
    /// Bytes of a record that has not fully arrived yet (at most one record).
    partial: Vec<u8>,
    /// The peer sent close_notify: nothing more may arrive.
    peer_closed: bool,
}

impl std::fmt::Debug for Tls13Records {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls13Records")
            .field("tx_seq", &self.tx.seq)
            .field("rx_seq", &self.rx.seq)
            .field("partial", &self.partial.len())
            .field("peer_closed", &self.peer_closed)
            .finish_non_exhaustive()
    }
}

impl Tls13Records {
    /// Why `conn` cannot be taken over, if it cannot: still handshaking, records waiting to be
    /// written, not TLS 1.3, or a suite this layer does not seal.
    pub fn can_take_over(conn: &TlsConn) -> Result<(), &'static str> {
        if conn.is_handshaking() {
            return Err("handshake not finished");
        }
        if conn.wants_write() {
            return Err("records still waiting to be written");
        }
        if conn.protocol_version() != Some(ProtocolVersion::TLSv1_3) {
            return Err("not TLS 1.3");
        }
        match conn.negotiated_cipher_suite() {
            Some(SupportedCipherSuite::Tls13(_)) => Ok(()),
            _ => Err("no TLS 1.3 cipher suite"),
        }
    }

    /// Takes the traffic keys out of `conn`, which must pass [`Tls13Records::can_take_over`],
    /// have been created from a config with `enable_secret_extraction`, and hold no received
    /// bytes it has not processed (its reader stopped at a record boundary).
    pub fn take_over(conn: TlsConn) -> Result<Tls13Records, String> {
        Self::can_take_over(&conn).map_err(str::to_string)?;
        let tx_limit = match conn.negotiated_cipher_suite() {
            Some(SupportedCipherSuite::Tls13(s)) => s.common.confidentiality_limit,
            _ => return Err("no TLS 1.3 cipher suite".into()),
        };
        let secrets = conn
            .dangerous_extract_secrets()
            .map_err(|e| format!("taking the traffic keys from rustls: {e}"))?;
        Ok(Tls13Records {
            tx: Keys::new(secrets.tx.0, secrets.tx.1)?,
            rx: Keys::new(secrets.rx.0, secrets.rx.1)?,
            // Stop well before the limit; rustls itself refreshes keys near it.
            tx_limit: tx_limit.saturating_sub(tx_limit / 16),
            partial: Vec::new(),
            peer_closed: false,
        })
    }

    /// True once the peer's close_notify arrived.
    pub fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// Seals `plain` as application-data records appended to `out`.
    pub fn seal(&mut self, plain: &[u8], out: &mut impl RecordOut) -> io::Result<()> {
        for chunk in plain.chunks(MAX_PLAIN) {
            self.seal_record(CT_APPLICATION_DATA, chunk, out)?;
        }
        Ok(())
    }

    /// Appends a sealed close_notify alert (after the last record of a clean end).
    pub fn seal_close_notify(&mut self, out: &mut impl RecordOut) -> io::Result<()> {
        self.seal_record(CT_ALERT, &[1, ALERT_CLOSE_NOTIFY], out)
    }

    fn seal_record(
        &mut self,
        content_type: u8,
        chunk: &[u8],
        out: &mut impl RecordOut,
    ) -> io::Result<()> {
        self.seal_padded(content_type, chunk, 0, out)
    }

    /// Seals one record: `chunk`, the inner content type, `padding` zero bytes (RFC 8446 5.4;
    /// warren sends none, a peer may).
    fn seal_padded(
        &mut self,
        content_type: u8,
        chunk: &[u8],
        padding: usize,
        out: &mut impl RecordOut,
    ) -> io::Result<()> {
        if self.tx.seq >= self.tx_limit {
            return Err(io::Error::other(format!(
                "TLS: {} records sealed with one key, the cipher's safe limit; the session \
                 ends and the client reconnects with new keys",
                self.tx.seq
            )));
        }
        let len = chunk.len() + 1 + padding + TAG_LEN;
        if len > MAX_CIPHER {
            return Err(io::Error::other(format!(
                "TLS: a record of {len} bytes is over the {MAX_CIPHER} allowed"
            )));
        }
        let header = [CT_APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
        out.put_slice(&header);
        let start = out.as_mut().len();
        out.put_slice(chunk);
        out.put_u8(content_type);
        out.put_bytes(0, padding);
        let nonce = self.tx.next_nonce();
        let tag = self
            .tx
            .key
            .seal_in_place_separate_tag(nonce, aead::Aad::from(header), &mut out.as_mut()[start..])
            .map_err(|_| io::Error::other("TLS: sealing a record failed"))?;
        out.put_slice(tag.as_ref());
        Ok(())
    }

    /// Opens the records in `data` (any slice of the byte stream: records may span calls) and
    /// appends their application data to `plain`. On an error nothing of the failing record
    /// is appended; the session must end (the stream cannot be resynchronised).
    pub fn open(&mut self, mut data: &[u8], plain: &mut BytesMut) -> io::Result<()> {
        while !data.is_empty() {
            if !self.partial.is_empty() || data.len() < HEADER_LEN {
                // Collect one record across calls.
                let have = self.partial.len();
                let want = if have < HEADER_LEN {
                    HEADER_LEN - have
                } else {
                    HEADER_LEN + record_len(&self.partial[..HEADER_LEN])? - have
                };
                let n = want.min(data.len());
                self.partial.extend_from_slice(&data[..n]);
                data = &data[n..];
                let have = self.partial.len();
                if have == HEADER_LEN {
                    // Validate the header now, and ask for the body on the next round.
                    record_len(&self.partial)?;
                    continue;
                }
                if have > HEADER_LEN && have == HEADER_LEN + record_len(&self.partial)? {
                    let mut record = std::mem::take(&mut self.partial);
                    let header: [u8; HEADER_LEN] = record[..HEADER_LEN]
                        .try_into()
                        .map_err(|_| bad_data("TLS: short record header"))?;
                    if let Some(n) = self.open_record(header, &mut record[HEADER_LEN..])? {
                        plain.extend_from_slice(&record[HEADER_LEN..HEADER_LEN + n]);
                    }
                    // Keep the allocation for the next record that spans reads.
                    record.clear();
                    self.partial = record;
                }
                continue;
            }
            let header: [u8; HEADER_LEN] = data[..HEADER_LEN]
                .try_into()
                .map_err(|_| bad_data("TLS: short record header"))?;
            let total = HEADER_LEN + record_len(&header)?;
            if data.len() < total {
                self.partial.reserve(total);
                self.partial.extend_from_slice(data);
                return Ok(());
            }
            // The whole record is here: copy its body once, into `plain`, and open it there.
            let start = plain.len();
            plain.extend_from_slice(&data[HEADER_LEN..total]);
            data = &data[total..];
            match self.open_record(header, &mut plain[start..]) {
                Ok(Some(n)) => plain.truncate(start + n),
                Ok(None) => plain.truncate(start),
                Err(e) => {
                    plain.truncate(start);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Opens one record body in place. Returns the length of its application data at the
    /// front of `body`, or None for a record that carries none (close_notify, a ticket).
    fn open_record(
        &mut self,
        header: [u8; HEADER_LEN],
        body: &mut [u8],
    ) -> io::Result<Option<usize>> {
        if self.peer_closed {
            return Err(bad_data("TLS: a record after the peer's close_notify"));
        }
        let nonce = self.rx.next_nonce();
        let inner = self
            .rx
            .key
            .open_in_place(nonce, aead::Aad::from(header), body)
            .map_err(|_| bad_data("TLS: a record failed authentication (corrupt or forged)"))?;
        if inner.len() > MAX_PLAIN + 1 {
            return Err(bad_data(format!(
                "TLS: a record's plaintext is {} bytes, over the 16,385 allowed",
                inner.len()
            )));
        }
        // TLSInnerPlaintext: content, content type, zero padding.
        let Some(type_at) = inner.iter().rposition(|&b| b != 0) else {
            return Err(bad_data("TLS: a record with no content type"));
        };
        match inner[type_at] {
            CT_APPLICATION_DATA => Ok(Some(type_at)),
            CT_ALERT => {
                if type_at == 2 && inner[1] == ALERT_CLOSE_NOTIFY {
                    self.peer_closed = true;
                    Ok(None)
                } else if type_at == 2 {
                    Err(bad_data(format!("TLS: the peer sent alert {}", inner[1])))
                } else {
                    Err(bad_data("TLS: a malformed alert"))
                }
            }
            CT_HANDSHAKE => match inner.first() {
                Some(&HS_NEW_SESSION_TICKET) if ticket_is_whole(&inner[..type_at]) => Ok(None),
                Some(&HS_KEY_UPDATE) => Err(bad_data(
                    "TLS: the peer asked for a key update, which sessions do not support after \
                     the handshake",
                )),
                _ => Err(bad_data(
                    "TLS: an unexpected handshake message after the handshake",
                )),
            },
            t => Err(bad_data(format!("TLS: a record of content type {t}"))),
        }
    }
}

/// For the `records` fuzz target (`fuzz/fuzz_targets/records.rs`): two ends of one session
/// with fixed AES-128-GCM keys, and what a peer may seal that warren never does.
#[cfg(feature = "fuzzing")]
impl Tls13Records {
    /// The two ends of a session: what one seals, the other opens.
    pub fn fuzz_pair() -> (Tls13Records, Tls13Records) {
        let keys = |k: u8| Keys {
            key: aead::LessSafeKey::new(
                aead::UnboundKey::new(&aead::AES_128_GCM, &[k; 16]).expect("a 16-byte key"),
            ),
            iv: [k ^ 0x5a; 12],
            seq: 0,
        };
        let end = |tx: u8, rx: u8| Tls13Records {
            tx: keys(tx),
            rx: keys(rx),
            tx_limit: 1 << 24,
            partial: Vec::new(),
            peer_closed: false,
        };
        (end(1, 2), end(2, 1))
    }

    /// Seals one record of any inner content type with `padding` zero bytes.
    pub fn fuzz_seal(
        &mut self,
        content_type: u8,
        content: &[u8],
        padding: usize,
        out: &mut Vec<u8>,
    ) -> io::Result<()> {
        self.seal_padded(content_type, content, padding, out)
    }

    /// Bytes of a record collected across calls.
    pub fn fuzz_partial_len(&self) -> usize {
        self.partial.len()
    }
}

/// A NewSessionTicket message that fits its record exactly (4-byte handshake header + body).
fn ticket_is_whole(msg: &[u8]) -> bool {
    msg.len() >= 4
        && usize::from(msg[1]) << 16 | usize::from(msg[2]) << 8 | usize::from(msg[3])
            == msg.len() - 4
}

/// The body length a protected record's header announces, checked.
fn record_len(header: &[u8]) -> io::Result<usize> {
    let len = usize::from(header[3]) << 8 | usize::from(header[4]);
    match header[0] {
        CT_APPLICATION_DATA => {}
        CT_CHANGE_CIPHER_SPEC | CT_ALERT | CT_HANDSHAKE => {
            return Err(bad_data(format!(
                "TLS: an unprotected record (content type {}) after the handshake",
                header[0]
            )))
        }
        t => {
            return Err(bad_data(format!(
                "TLS: a record of unknown content type {t}"
            )))
        }
    }
    if header[1..3] != [3, 3] {
        return Err(bad_data(format!(
            "TLS: a record with version bytes {:02x}{:02x}, not 0303",
            header[1], header[2]
        )));
    }
    if !(TAG_LEN + 1..=MAX_CIPHER).contains(&len) {
        return Err(bad_data(format!(
            "TLS: a record of {len} bytes (allowed: {}..={MAX_CIPHER})",
            TAG_LEN + 1
        )));
    }
    Ok(len)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Write;
    use std::sync::Arc;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use rustls::{ClientConfig, ClientConnection, Connection, RootCertStore, ServerConfig};
    use rustls::{ServerConnection, SupportedCipherSuite};

    use super::*;

    pub(crate) fn configs(suite: SupportedCipherSuite) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
        let cert = rcgen::generate_simple_self_signed(vec!["warren.test".to_string()]).unwrap();
        let der = CertificateDer::from(cert.cert.der().to_vec());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der()));
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites = vec![suite];
        let provider = Arc::new(provider);
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key)
            .unwrap();
        server.enable_secret_extraction = true;
        let mut roots = RootCertStore::empty();
        roots.add(der).unwrap();
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.enable_secret_extraction = true;
        (Arc::new(server), Arc::new(client))
    }

    /// Moves every pending record from `from` to `to` and lets `to` process them.
    fn pump(from: &mut Connection, to: &mut Connection) {
        let mut wire = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut wire).unwrap();
        }
        let mut rd = &wire[..];
        while !rd.is_empty() {
            to.read_tls(&mut rd).unwrap();
            to.process_new_packets().unwrap();
        }
    }

    /// A finished handshake (tickets delivered) between a rustls server and client.
    fn handshake(suite: SupportedCipherSuite) -> (Connection, Connection) {
        let (sc, cc) = configs(suite);
        let mut server = Connection::from(ServerConnection::new(sc).unwrap());
        let name = ServerName::try_from("warren.test").unwrap();
        let mut client = Connection::from(ClientConnection::new(cc, name).unwrap());
        for _ in 0..10 {
            pump(&mut client, &mut server);
            pump(&mut server, &mut client);
        }
        assert!(!client.is_handshaking() && !server.is_handshaking());
        assert!(!client.wants_write() && !server.wants_write());
        (server, client)
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 131 + i / 7) as u8).collect()
    }

    /// Plaintext rustls reads from `wire`.
    fn rustls_reads(conn: &mut Connection, wire: &[u8]) -> Vec<u8> {
        let mut rd = wire;
        let mut got = BytesMut::new();
        while !rd.is_empty() {
            conn.read_tls(&mut rd).unwrap();
            crate::transport::process_into(conn, &mut got).unwrap();
        }
        got.to_vec()
    }

    /// Feeds `wire` to `records` in pieces of the given sizes, in turn.
    fn open_in_pieces(records: &mut Tls13Records, wire: &[u8], sizes: &[usize]) -> Vec<u8> {
        let mut plain = BytesMut::new();
        let (mut at, mut i) = (0, 0);
        while at < wire.len() {
            let n = sizes[i % sizes.len()].min(wire.len() - at);
            records.open(&wire[at..at + n], &mut plain).unwrap();
            at += n;
            i += 1;
        }
        plain.to_vec()
    }

    pub(crate) const SUITES: [SupportedCipherSuite; 3] = [
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
        rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];

    #[test]
    fn records_sealed_here_are_read_by_rustls_and_back_for_every_suite() {
        for suite in SUITES {
            let (server, mut client) = handshake(suite);
            let mut records = Tls13Records::take_over(server).unwrap();
            // Server -> client: several records, one partial, sealed into a Vec.
            let data = pattern(3 * MAX_PLAIN + 1234);
            let mut wire = Vec::new();
            records.seal(&data, &mut wire).unwrap();
            records.seal(b"", &mut wire).unwrap();
            records.seal(b"x", &mut wire).unwrap();
            assert_eq!(wire.len(), data.len() + 1 + 5 * OVERHEAD);
            let mut want = data.clone();
            want.push(b'x');
            assert_eq!(rustls_reads(&mut client, &wire), want, "{suite:?}");

            // Client -> server, opened in every kind of split: header cut, body cut, several
            // records per piece.
            let data = pattern(5 * MAX_PLAIN + 77);
            client.set_buffer_limit(None);
            client.writer().write_all(&data).unwrap();
            let mut wire = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut wire).unwrap();
            }
            let got = open_in_pieces(&mut records, &wire, &[1, 3, 7, 4999, 16_405, 70_000]);
            assert_eq!(got, data, "{suite:?}");
            assert!(!records.peer_closed());

            // Clean ends both ways.
            let mut wire = Vec::new();
            records.seal_close_notify(&mut wire).unwrap();
            let mut rd = &wire[..];
            client.read_tls(&mut rd).unwrap();
            let state = client.process_new_packets().unwrap();
            assert!(state.peer_has_closed());
            client.send_close_notify();
            let mut wire = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut wire).unwrap();
            }
            assert!(open_in_pieces(&mut records, &wire, &[2]).is_empty());
            assert!(records.peer_closed());
            let err = records.open(&wire, &mut BytesMut::new()).unwrap_err();
            assert!(
                err.to_string().contains("after the peer's close_notify"),
                "{err}"
            );
        }
    }

    #[test]
    fn both_ends_taken_over_talk_to_each_other() {
        let (server, client) = handshake(SUITES[0]);
        let (mut s, mut c) = (
            Tls13Records::take_over(server).unwrap(),
            Tls13Records::take_over(client).unwrap(),
        );
        for round in 0..3 {
            let data = pattern(40_000 + round);
            let mut wire = BytesMut::new();
            c.seal(&data, &mut wire).unwrap();
            assert_eq!(open_in_pieces(&mut s, &wire, &[16_000]), data);
            let mut wire = Vec::new();
            s.seal(&data[..round + 1], &mut wire).unwrap();
            assert_eq!(open_in_pieces(&mut c, &wire, &[1]), &data[..round + 1]);
        }
    }

    #[test]
    fn a_tampered_record_fails_and_appends_nothing() {
        let (server, client) = handshake(SUITES[0]);
        let mut s = Tls13Records::take_over(server).unwrap();
        let mut c = Tls13Records::take_over(client).unwrap();
        let mut wire = Vec::new();
        c.seal(b"first", &mut wire).unwrap();
        let first = wire.len();
        c.seal(b"second", &mut wire).unwrap();
        wire[first + HEADER_LEN + 2] ^= 1;
        let mut plain = BytesMut::from(&b"kept"[..]);
        let err = s.open(&wire, &mut plain).unwrap_err();
        assert!(err.to_string().contains("failed authentication"), "{err}");
        assert_eq!(&plain[..], b"keptfirst");
    }

    #[test]
    fn a_replayed_or_reordered_record_fails() {
        let (server, client) = handshake(SUITES[0]);
        let mut s = Tls13Records::take_over(server).unwrap();
        let mut c = Tls13Records::take_over(client).unwrap();
        let (mut one, mut two) = (Vec::new(), Vec::new());
        c.seal(b"one", &mut one).unwrap();
        c.seal(b"two", &mut two).unwrap();
        assert!(s.open(&two, &mut BytesMut::new()).is_err());
        let (server, client) = handshake(SUITES[0]);
        let mut s = Tls13Records::take_over(server).unwrap();
        let mut c = Tls13Records::take_over(client).unwrap();
        let mut one = Vec::new();
        c.seal(b"one", &mut one).unwrap();
        let mut plain = BytesMut::new();
        s.open(&one, &mut plain).unwrap();
        assert!(s.open(&one, &mut plain).is_err());
        assert_eq!(&plain[..], b"one");
    }

    #[test]
    fn a_key_update_from_the_peer_is_refused_by_name() {
        let (server, mut client) = handshake(SUITES[0]);
        let mut s = Tls13Records::take_over(server).unwrap();
        client.refresh_traffic_keys().unwrap();
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).unwrap();
        }
        let err = s.open(&wire, &mut BytesMut::new()).unwrap_err();
        assert!(err.to_string().contains("key update"), "{err}");
    }

    #[test]
    fn bad_headers_are_named_before_any_body_is_buffered() {
        let (server, _client) = handshake(SUITES[0]);
        let mut s = Tls13Records::take_over(server).unwrap();
        for (header, why) in [
            ([22u8, 3, 3, 0, 40], "unprotected record (content type 22)"),
            ([21, 3, 3, 0, 2], "unprotected record (content type 21)"),
            ([99, 3, 3, 0, 40], "unknown content type 99"),
            ([23, 3, 1, 0, 40], "version bytes 0301"),
            ([23, 3, 3, 0x42, 0x01], "16897 bytes"),
            ([23, 3, 3, 0, 16], "16 bytes"),
        ] {
            // Whole header in one piece, and one byte at a time.
            let err = s.open(&header, &mut BytesMut::new()).unwrap_err();
            assert!(err.to_string().contains(why), "{err} / {why}");
            let mut fresh = Tls13Records::take_over(handshake(SUITES[0]).0).unwrap();
            let mut r = Ok(());
            for b in header {
                r = fresh.open(&[b], &mut BytesMut::new());
                if r.is_err() {
                    break;
                }
            }
            assert!(r.unwrap_err().to_string().contains(why));
            assert!(fresh.partial.len() <= HEADER_LEN);
        }
    }

    #[test]
    fn a_connection_that_cannot_be_taken_over_says_why() {
        let (sc, cc) = configs(SUITES[0]);
        let name = ServerName::try_from("warren.test").unwrap();
        let client = Connection::from(ClientConnection::new(cc, name).unwrap());
        assert_eq!(
            Tls13Records::can_take_over(&client),
            Err("handshake not finished")
        );
        let mut server = Connection::from(ServerConnection::new(sc).unwrap());
        let mut client = client;
        pump(&mut client, &mut server);
        assert!(Tls13Records::can_take_over(&server).is_err());
        assert!(Tls13Records::take_over(server).is_err());
    }

    /// Hostile bytes in any split: an error or nothing, never a panic, never more than one
    /// record's worth buffered, and nothing appended to the plaintext.
    #[test]
    fn arbitrary_bytes_are_refused_without_buffering_more_than_a_record() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let (server, _client) = handshake(SUITES[0]);
        let mut s = Tls13Records::take_over(server).unwrap();
        for case in 0..300 {
            let len = (next() % 40_000) as usize;
            let mut wire: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Half the cases start with a plausible header, so bodies get buffered and opened.
            if case % 2 == 0 && wire.len() >= HEADER_LEN {
                let body = 17 + (next() % (MAX_CIPHER as u64 - 16)) as usize;
                wire[..HEADER_LEN].copy_from_slice(&[23, 3, 3, (body >> 8) as u8, body as u8]);
            }
            let mut plain = BytesMut::new();
            let mut at = 0;
            while at < wire.len() {
                let n = (1 + next() % 20_000) as usize;
                let n = n.min(wire.len() - at);
                let r = s.open(&wire[at..at + n], &mut plain);
                assert!(s.partial.len() <= HEADER_LEN + MAX_CIPHER);
                at += n;
                if r.is_err() {
                    break;
                }
            }
            assert!(
                plain.is_empty(),
                "case {case}: forged bytes became plaintext"
            );
            // A failed session is dropped; start the next case on fresh keys.
            s = Tls13Records::take_over(handshake(SUITES[0]).0).unwrap();
        }
    }
}
