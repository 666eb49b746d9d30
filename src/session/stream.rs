//! The byte stream a connection's frames run on: the TCP stream itself
//! (protocol 1, plaintext) or, after the Noise handshake, records over it
//! (protocol 2): a 2-byte big-endian length, then that many bytes of one
//! Noise transport message (ciphertext and its 16-byte tag). The frames of
//! protocol 1 are the concatenated plaintext of the records; a record
//! boundary means nothing to them.
//!
//! Records are sealed per write and opened per read, straight between the
//! caller's buffer and the socket where they fit: an idle session's ping
//! and pong go through the stack, with no buffer held between them, and a
//! large message is sealed from the application's buffer
//! ([`Stream::seal_frame`]), not copied to the write buffer first. With
//! the `ring` feature a large read goes into the reader's own buffer and
//! its records are opened there ([`open_in_place`]), not read aside and
//! copied as they are opened.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

#[cfg(feature = "ring")]
use super::transport::InPlace;
use super::transport::{SplitKeys, TransportKeys};
use crate::event::ProtocolViolation;

/// The length prefix of a record.
pub(crate) const RECORD_HEADER: usize = 2;
/// The authentication tag at the end of each record.
pub(crate) const TAG: usize = 16;
/// The largest Noise message, so the largest record body.
pub(crate) const MAX_RECORD: usize = 65535;
/// The most plaintext one record carries.
pub(crate) const MAX_RECORD_PLAINTEXT: usize = MAX_RECORD - TAG;
/// What a record adds to its plaintext.
const OVERHEAD: usize = RECORD_HEADER + TAG;
/// Most plaintext lanbeat seals in one record on a slow path (a receiver
/// takes up to [`MAX_RECORD_PLAINTEXT`]): as TLS does, 16 KiB, so that
/// authenticated records, each counted as progress of the stream, keep
/// arriving while a large message crosses (2 s per record at 64 kbit/s).
/// On a fast path (see [`Stream::set_large_records`]) records are as
/// large as they may be: a quarter of the sealing calls.
const RECORD_CHUNK: usize = 16 * 1024;
/// Most plaintext sealed per write call: two of the largest records (so
/// the sealed, unwritten records stay below 128 KiB plus their overhead,
/// and a 64 KiB message with its frame header is one call, not a call
/// and a tiny remainder).
const WRITE_CHUNK: usize = 2 * MAX_RECORD_PLAINTEXT;
/// Reads and writes this small go through the stack.
const STACK: usize = 512;
/// Most ciphertext read per call.
const READ_MAX: usize = 128 * 1024;
/// Reads into at least this much room are opened in place (with the
/// `ring` feature): the ciphertext is read into the reader's buffer and
/// each record opened there, instead of being read aside and copied as it
/// is opened. Below it, a read is too small for the saving to pay for
/// keying ring's cipher.
#[cfg(feature = "ring")]
const IN_PLACE: usize = 8 * 1024;

/// A connection's stream: plaintext, or Noise records.
pub(crate) enum Stream {
    /// Protocol 1: frames straight on TCP.
    Plain(TcpStream),
    /// Protocol 2: frames inside Noise records.
    Noise(Box<NoiseStream>),
}

/// TCP with the Noise transport keys of a completed handshake.
pub(crate) struct NoiseStream {
    tcp: TcpStream,
    rec: Records,
    /// Records sealed, not yet written.
    tx: Sealed,
    /// The handshake's keys, until the session's liveness datagrams take
    /// them (or it has none).
    split: Option<Box<SplitKeys>>,
}

/// The record layer without the socket: the transport keys, what was read
/// and not yet opened, what was opened and not yet taken. (Also driven
/// directly by the fuzzer, `fuzzing::records`.)
pub(crate) struct Records {
    state: Cipher,
    /// Ciphertext read, not yet a whole record.
    rx: BytesMut,
    /// Plaintext opened, not yet taken by the reader (the part of a record
    /// that did not fit its buffer).
    plain: BytesMut,
}

/// The transport keys of a completed handshake and the next nonce of
/// each direction of the stream. The session's liveness datagrams
/// (`session::datagram`) use the same keys with nonces from
/// [`DATAGRAM_NONCES`] on; the stream's count from 0 and stay below it.
pub(crate) struct Cipher {
    keys: TransportKeys,
    tx: u64,
    rx: u64,
    /// Seal records of up to [`MAX_RECORD_PLAINTEXT`], not
    /// [`RECORD_CHUNK`].
    large: bool,
}

/// The first nonce of the datagram range: the stream's nonces are below
/// it (2^63 records: never reached), the datagrams' at or above it, so no
/// nonce is used twice under one key.
pub(crate) const DATAGRAM_NONCES: u64 = 1 << 63;

/// Sealed records not yet written: `buf[at..end]`. The cipher seals into
/// initialized memory, so the buffer is kept initialized and written over:
/// it is zeroed once as it grows, not for every record (a `BytesMut`
/// would be zeroed anew before each).
#[derive(Default)]
pub(crate) struct Sealed {
    buf: Vec<u8>,
    at: usize,
    end: usize,
}

impl Sealed {
    /// The bytes waiting.
    fn pending(&self) -> &[u8] {
        &self.buf[self.at..self.end]
    }

    fn len(&self) -> usize {
        self.end - self.at
    }

    fn is_empty(&self) -> bool {
        self.at == self.end
    }

    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Marks `n` bytes written.
    fn advance(&mut self, n: usize) {
        self.at = (self.at + n).min(self.end);
        if self.at == self.end {
            (self.at, self.end) = (0, 0);
        }
    }

    /// `n` bytes of room at the end, to seal into; [`Sealed::commit`]
    /// keeps what was used.
    fn room(&mut self, n: usize) -> &mut [u8] {
        if self.end + n > self.buf.len() {
            self.buf.copy_within(self.at..self.end, 0);
            (self.at, self.end) = (0, self.end - self.at);
            if self.end + n > self.buf.len() {
                self.buf.resize(self.end + n, 0);
            }
        }
        &mut self.buf[self.end..self.end + n]
    }

    fn commit(&mut self, n: usize) {
        self.end += n;
    }

    fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.room(bytes.len()).copy_from_slice(bytes);
        self.commit(bytes.len());
    }

    /// Gives the memory back if nothing waits.
    fn release_idle(&mut self) {
        if self.is_empty() && self.buf.capacity() > 0 {
            *self = Sealed::default();
        }
    }
}

impl Cipher {
    fn seal(&mut self, payload: &[u8], out: &mut [u8]) -> Result<usize, snow::Error> {
        if self.tx >= DATAGRAM_NONCES {
            return Err(snow::Error::Input);
        }
        let n = self.keys.send.seal(self.tx, payload, out)?;
        self.tx += 1;
        Ok(n)
    }

    fn open(&mut self, message: &[u8], out: &mut [u8]) -> Result<usize, snow::Error> {
        if self.rx >= DATAGRAM_NONCES {
            return Err(snow::Error::Decrypt);
        }
        let n = self.keys.recv.open(self.rx, message, out)?;
        self.rx += 1;
        Ok(n)
    }

    /// As [`Cipher::open`], with the message at `buf[from..]` opened into
    /// the front of `buf` by `key` (this direction's, see
    /// [`super::transport::InPlace`]).
    #[cfg(feature = "ring")]
    fn open_within(
        &mut self,
        key: &InPlace,
        buf: &mut [u8],
        from: usize,
    ) -> Result<usize, snow::Error> {
        if self.rx >= DATAGRAM_NONCES {
            return Err(snow::Error::Decrypt);
        }
        let n = key.open_within(self.rx, buf, from)?;
        self.rx += 1;
        Ok(n)
    }
}

impl Records {
    pub(crate) fn new(keys: TransportKeys) -> Records {
        Records {
            state: Cipher {
                keys,
                tx: 0,
                rx: 0,
                large: false,
            },
            rx: BytesMut::new(),
            plain: BytesMut::new(),
        }
    }

    /// Moves opened plaintext to `out`, then opens the whole records
    /// buffered so far into it.
    pub(crate) fn read_buffered(&mut self, out: &mut ReadBuf<'_>) -> io::Result<()> {
        if !self.plain.is_empty() {
            let n = self.plain.len().min(out.remaining());
            out.put_slice(&self.plain[..n]);
            self.plain.advance(n);
        }
        if !self.rx.is_empty() && out.remaining() > 0 {
            let used = open(&mut self.state, &self.rx, out, &mut self.plain)?;
            self.rx.advance(used);
        }
        Ok(())
    }

    /// Opens the whole records at the front of `got` (just read, nothing
    /// buffered before it) into `out`; keeps the rest.
    pub(crate) fn read_from(&mut self, got: &[u8], out: &mut ReadBuf<'_>) -> io::Result<()> {
        debug_assert!(self.rx.is_empty() && self.plain.is_empty());
        let used = open(&mut self.state, got, out, &mut self.plain)?;
        self.rx.extend_from_slice(&got[used..]);
        Ok(())
    }

    /// This direction's cipher, to open records in place.
    #[cfg(feature = "ring")]
    pub(crate) fn in_place_key(&self) -> io::Result<InPlace> {
        self.state
            .keys
            .recv
            .in_place()
            .ok_or_else(|| io::Error::other("cannot key the record cipher"))
    }

    /// Moves the partial record held to `out`, for ciphertext to be read
    /// behind it; returns where it starts in `out`.
    #[cfg(feature = "ring")]
    pub(crate) fn carry_into(&mut self, out: &mut ReadBuf<'_>) -> usize {
        let start = out.filled().len();
        out.put_slice(&self.rx);
        self.rx.clear();
        start
    }

    /// Takes back what [`Records::carry_into`] moved from `start` on
    /// (nothing was read behind it).
    #[cfg(feature = "ring")]
    pub(crate) fn uncarry(&mut self, out: &mut ReadBuf<'_>, start: usize) {
        self.rx.extend_from_slice(&out.filled()[start..]);
        out.set_filled(start);
    }

    /// Opens the whole records of the ciphertext in `out` from `start` on
    /// where they are, with `key` (from [`Records::in_place_key`]), leaving
    /// their plaintext filled in `out`; keeps what follows them, a partial
    /// record, for the next read.
    #[cfg(feature = "ring")]
    pub(crate) fn open_read(
        &mut self,
        key: &InPlace,
        out: &mut ReadBuf<'_>,
        start: usize,
    ) -> io::Result<()> {
        let buf = &mut out.filled_mut()[start..];
        let (plain, used) = open_in_place(&mut self.state, key, buf)?;
        self.rx.extend_from_slice(&buf[used..]);
        out.set_filled(start + plain);
        Ok(())
    }

    #[cfg(any(test, fuzzing))]
    /// Buffers ciphertext read.
    pub(crate) fn feed(&mut self, bytes: &[u8]) {
        self.rx.extend_from_slice(bytes);
    }

    #[cfg(any(test, fuzzing))]
    /// How many bytes are buffered, opened or not (bounded by one record
    /// plus one read).
    pub(crate) fn buffered(&self) -> usize {
        self.rx.len() + self.plain.len()
    }

    #[cfg(any(test, fuzzing))]
    /// Whether the stream ended inside a record.
    pub(crate) fn inside_record(&self) -> bool {
        !self.rx.is_empty()
    }

    #[cfg(any(test, fuzzing))]
    /// Seals `src` as records at the end of `dst`.
    pub(crate) fn seal(&mut self, src: &[u8], dst: &mut BytesMut) -> io::Result<()> {
        let mut sealed = Sealed::default();
        seal(&mut self.state, src, &mut sealed)?;
        dst.extend_from_slice(sealed.pending());
        Ok(())
    }

    /// Whether a read can make progress without the socket.
    fn has_buffered(&self) -> bool {
        !self.plain.is_empty() || (!self.rx.is_empty() && record_need(&self.rx) == 0)
    }
}

/// A record that breaks the protocol, as an I/O error that carries the
/// violation (see [`violation_of`]).
fn violation(v: ProtocolViolation) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, v)
}

/// The protocol violation an I/O error of a [`Stream`] stands for, if any.
pub(crate) fn violation_of(e: &io::Error) -> Option<ProtocolViolation> {
    e.get_ref()?.downcast_ref::<ProtocolViolation>().cloned()
}

/// Opens the whole records at the front of `src` into `out`. A record that
/// does not fit is left for the next read once `out` got something, or
/// else opened into `plain` (empty on entry) and `out` filled from it: a
/// reader that offers room for whole records gets them opened in place,
/// one that offers less still gets its bytes. Returns how many bytes of
/// `src` were used.
fn open(
    state: &mut Cipher,
    src: &[u8],
    out: &mut ReadBuf<'_>,
    plain: &mut BytesMut,
) -> io::Result<usize> {
    let mut at = 0;
    while out.remaining() > 0 {
        let Some(len) = whole_record(&src[at..])? else {
            break;
        };
        let record = &src[at + RECORD_HEADER..at + RECORD_HEADER + len];
        let n = len - TAG;
        // The cipher opens a record in place in its output, so that needs
        // room for the tag too (with less, snow copies the record to a new
        // allocation first): the tag's 16 bytes are scratch past the
        // plaintext.
        if out.remaining() >= len {
            state
                .open(record, out.initialize_unfilled_to(len))
                .map_err(unauthentic)?;
            out.advance(n);
        } else if at > 0 {
            break;
        } else {
            plain.resize(len, 0);
            state.open(record, plain).map_err(unauthentic)?;
            plain.truncate(n);
            let k = out.remaining().min(n);
            out.put_slice(&plain[..k]);
            plain.advance(k);
        }
        at += RECORD_HEADER + len;
    }
    Ok(at)
}

/// Opens the whole records at the front of `buf` where they are: each
/// record's plaintext goes right behind the one before it, so they end up
/// together at the front. Returns how many bytes of plaintext that is and
/// how many bytes of `buf` the records took (a partial record may follow).
#[cfg(feature = "ring")]
pub(crate) fn open_in_place(
    state: &mut Cipher,
    key: &InPlace,
    buf: &mut [u8],
) -> io::Result<(usize, usize)> {
    let (mut plain, mut at) = (0, 0);
    while let Some(len) = whole_record(&buf[at..])? {
        let end = at + RECORD_HEADER + len;
        plain += state
            .open_within(key, &mut buf[plain..end], at + RECORD_HEADER - plain)
            .map_err(unauthentic)?;
        at = end;
    }
    Ok((plain, at))
}

/// The length of the record at the front of `src` (its body: ciphertext
/// and tag) if `src` holds it whole, `None` if not yet; an error if its
/// header says it is shorter than its tag.
fn whole_record(src: &[u8]) -> io::Result<Option<usize>> {
    let Some(&[a, b]) = src.get(..RECORD_HEADER) else {
        return Ok(None);
    };
    let len = u16::from_be_bytes([a, b]) as usize;
    if len < TAG {
        return Err(violation(ProtocolViolation::BadRecord(
            "record shorter than its tag",
        )));
    }
    Ok((src.len() >= RECORD_HEADER + len).then_some(len))
}

/// The end of the stream inside a record.
fn ended_inside_record() -> io::Error {
    violation(ProtocolViolation::BadRecord(
        "connection ended inside a record",
    ))
}

/// A record that does not open.
fn unauthentic(_: snow::Error) -> io::Error {
    violation(ProtocolViolation::BadRecord("record failed authentication"))
}

/// Seals `chunk` (at most [`MAX_RECORD_PLAINTEXT`] bytes) as one record
/// into `dst`, which must have room for it; returns the record's length.
fn seal_one(state: &mut Cipher, chunk: &[u8], dst: &mut [u8]) -> io::Result<usize> {
    debug_assert!(chunk.len() <= MAX_RECORD_PLAINTEXT);
    let len = chunk.len() + TAG;
    dst[..RECORD_HEADER].copy_from_slice(&(len as u16).to_be_bytes());
    state
        .seal(chunk, &mut dst[RECORD_HEADER..RECORD_HEADER + len])
        .map_err(|e| io::Error::other(format!("cannot seal a record: {e}")))?;
    Ok(RECORD_HEADER + len)
}

/// Seals `src` as records at the end of `dst`: as few as the record size
/// allows, of even length (a 64 KiB message and its frame header, 9 bytes
/// over the largest record, are two records of 32 KiB, not one of 64 KiB
/// and one of 26 bytes, which the receiver would have to read apart).
fn seal(state: &mut Cipher, src: &[u8], dst: &mut Sealed) -> io::Result<()> {
    let most = if state.large {
        MAX_RECORD_PLAINTEXT
    } else {
        RECORD_CHUNK
    };
    let records = src.len().div_ceil(most).max(1);
    for chunk in src.chunks(src.len().div_ceil(records).max(1)) {
        let n = seal_one(state, chunk, dst.room(OVERHEAD + chunk.len()))?;
        dst.commit(n);
    }
    Ok(())
}

/// How many more bytes the partial record at the front of `rx` needs.
fn record_need(rx: &[u8]) -> usize {
    match rx {
        [a, b, ..] => {
            (RECORD_HEADER + u16::from_be_bytes([*a, *b]) as usize).saturating_sub(rx.len())
        }
        _ => RECORD_HEADER - rx.len(),
    }
}

impl NoiseStream {
    /// The stream of a finished handshake's keys; `None` when snow
    /// resolves no cipher for them.
    pub(crate) fn new(tcp: TcpStream, split: SplitKeys) -> Option<NoiseStream> {
        Some(NoiseStream {
            tcp,
            rec: Records::new(split.transport()?),
            tx: Sealed::default(),
            split: Some(Box::new(split)),
        })
    }

    /// The handshake's keys, for the session's liveness datagrams: once
    /// (later `None`), and gone from the stream.
    pub(crate) fn take_split(&mut self) -> Option<Box<SplitKeys>> {
        self.split.take()
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = out.remaining();
        loop {
            self.rec.read_buffered(out)?;
            if out.remaining() < before || out.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            // Nothing to give yet: more ciphertext. A small read with
            // nothing pending goes through the stack.
            let rx = &mut self.rec.rx;
            if rx.is_empty() && out.remaining() + OVERHEAD <= STACK {
                let mut stack = [std::mem::MaybeUninit::uninit(); STACK];
                let mut read = ReadBuf::uninit(&mut stack[..out.remaining() + OVERHEAD]);
                ready!(Pin::new(&mut self.tcp).poll_read(cx, &mut read))?;
                let got = read.filled();
                if got.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                self.rec.read_from(got, out)?;
                continue;
            }
            #[cfg(feature = "ring")]
            if out.remaining() >= IN_PLACE.max(rx.len() + record_need(rx)) {
                if !ready!(self.poll_read_in_place(cx, out))? {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            let rx = &mut self.rec.rx;
            let want = record_need(rx)
                .max(out.remaining() + OVERHEAD)
                .min(READ_MAX);
            rx.reserve(want);
            ready!(self.tcp.poll_read_ready(cx))?;
            match self.tcp.try_read_buf(rx) {
                Ok(0) if rx.is_empty() => return Poll::Ready(Ok(())),
                Ok(0) => return Poll::Ready(Err(ended_inside_record())),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Reads ciphertext into `out`, behind the partial record held from
    /// the last read (moved there first), and opens the whole records in
    /// place; what follows them, a partial record, is kept for the next
    /// read. `out` has room for at least the partial record whole.
    /// `Ok(false)` at the end of the stream (`out` as it was; inside a
    /// record it is an error), `Ok(true)` otherwise, with or without
    /// plaintext.
    #[cfg(feature = "ring")]
    fn poll_read_in_place(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<bool>> {
        ready!(self.tcp.poll_read_ready(cx))?;
        let start = self.rec.carry_into(out);
        match self.tcp.try_read_buf(out) {
            Ok(0) => {
                self.rec.uncarry(out, start);
                return Poll::Ready(if self.rec.rx.is_empty() {
                    Ok(false)
                } else {
                    Err(ended_inside_record())
                });
            }
            Ok(_) => {}
            Err(e) => {
                self.rec.uncarry(out, start);
                // Stale readiness (cleared now: the caller's next poll
                // waits), or an error.
                return Poll::Ready(match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(true),
                    _ => Err(e),
                });
            }
        }
        // Keyed only now that there is something to open (an AES key is
        // expanded).
        let key = self.rec.in_place_key()?;
        self.rec.open_read(&key, out, start)?;
        Poll::Ready(Ok(true))
    }

    /// Writes sealed records until none is left (`Ready`) or the socket
    /// takes no more (`Pending`).
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.tx.is_empty() {
            match ready!(Pin::new(&mut self.tcp).poll_write(cx, self.tx.pending()))? {
                0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                n => self.tx.advance(n),
            }
        }
        Poll::Ready(Ok(()))
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.poll_drain(cx))?;
        let src = &buf[..buf.len().min(WRITE_CHUNK)];
        if src.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if src.len() + OVERHEAD <= STACK {
            // One small record (a heartbeat, an ack): sealed on the stack
            // and written from there; only what the socket does not take
            // is kept.
            let mut stack = [0; STACK];
            let n = seal_one(&mut self.rec.state, src, &mut stack)?;
            let record = &stack[..n];
            // The record is sealed (its nonce used): it must go out, now
            // or later.
            let written = match Pin::new(&mut self.tcp).poll_write(cx, record) {
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => 0,
            };
            self.tx.extend_from_slice(&record[written..]);
        } else {
            seal(&mut self.rec.state, src, &mut self.tx)?;
            if let Poll::Ready(Err(e)) = self.poll_drain(cx) {
                return Poll::Ready(Err(e));
            }
        }
        Poll::Ready(Ok(src.len()))
    }
}

impl Stream {
    /// The TCP stream underneath.
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Noise(n) => &n.tcp,
        }
    }

    /// Makes dropping the stream reset the connection instead of closing
    /// it in order. A reset leaves at once; a FIN waits behind unacknowledged
    /// data, which a peer we can no longer hear may never acknowledge
    /// (one-way loss: it would time out a heartbeat timeout later instead of
    /// learning of the end now).
    pub(crate) fn reset_on_drop(&self) {
        let _ = socket2::SockRef::from(self.tcp()).set_linger(Some(std::time::Duration::ZERO));
    }

    /// Seals `head` and then `body` (what the write buffer holds with a
    /// large message's frame header, and that message's payload) as
    /// records behind those waiting to be written. The payload is sealed
    /// straight from the sender's buffer: copied once, as the cipher seals
    /// it, not first to the write buffer and then again. Does nothing and
    /// returns false on a plaintext stream.
    pub(crate) fn seal_frame(&mut self, head: &[u8], body: &[u8]) -> io::Result<bool> {
        let Stream::Noise(n) = self else {
            return Ok(false);
        };
        if !head.is_empty() {
            seal(&mut n.rec.state, head, &mut n.tx)?;
        }
        seal(&mut n.rec.state, body, &mut n.tx)?;
        Ok(true)
    }

    /// Whether the path is fast (the session's in-flight window is large:
    /// acks come back quickly), so records may be as large as allowed.
    #[inline]
    pub(crate) fn set_large_records(&mut self, large: bool) {
        if let Stream::Noise(n) = self {
            n.rec.state.large = large;
        }
    }

    /// Sets how long written data may stay unacknowledged before the
    /// kernel gives up on the connection (`TCP_USER_TIMEOUT`, where the
    /// platform has it; see `task::tune`).
    pub(crate) fn set_user_timeout(&self, timeout: std::time::Duration) {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if let Err(e) = socket2::SockRef::from(self.tcp()).set_tcp_user_timeout(Some(timeout)) {
            tracing::debug!(error = %e, "cannot set TCP_USER_TIMEOUT");
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        let _ = timeout;
    }

    /// `Ready` when a read may make progress (the socket is readable, or
    /// records wait to be opened).
    pub(crate) fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Noise(n) if n.rec.has_buffered() => Poll::Ready(Ok(())),
            s => s.tcp().poll_read_ready(cx),
        }
    }

    /// Whether the stream holds part of a record, read and not yet
    /// complete (more of it is on the way).
    pub(crate) fn inside_record(&self) -> bool {
        matches!(self, Stream::Noise(n) if !n.rec.rx.is_empty())
    }

    /// Whether frames go in Noise records.
    pub(crate) fn is_noise(&self) -> bool {
        matches!(self, Stream::Noise(_))
    }

    /// How many bytes of sealed records wait to be written (a flush writes
    /// them).
    pub(crate) fn unwritten(&self) -> usize {
        match self {
            Stream::Plain(_) => 0,
            Stream::Noise(n) => n.tx.len(),
        }
    }

    /// Gives back the memory of empty buffers (an idle session holds none).
    pub(crate) fn release_idle(&mut self) {
        if let Stream::Noise(n) = self {
            for b in [&mut n.rec.rx, &mut n.rec.plain] {
                if b.is_empty() && b.capacity() > 0 {
                    *b = BytesMut::new();
                }
            }
            n.tx.release_idle();
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Noise(n) => n.poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Noise(n) => n.poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Noise(n) => n.poll_drain(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Noise(n) => {
                ready!(n.poll_drain(cx))?;
                Pin::new(&mut n.tcp).poll_shutdown(cx)
            }
        }
    }
}

#[cfg(test)]
mod tests;
