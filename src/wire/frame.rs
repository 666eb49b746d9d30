//! Session frames on TCP.
//!
//! Every frame is a 4-byte big-endian length `L`, then `L` bytes: one type
//! byte and `L - 1` bytes of payload. `L` is checked against the limit before
//! any byte of the frame is buffered for it, so a hostile length prefix
//! cannot make the receiver allocate.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::error::FrameError;
use crate::peer::{PeerId, Role};

/// Length of the length prefix.
pub const LEN_PREFIX: usize = 4;
/// Bytes a data frame adds to its message: prefix plus type byte.
pub const DATA_OVERHEAD: usize = LEN_PREFIX + 1;
/// Smallest `max_frame_size` a node accepts as configuration.
pub const MIN_MAX_FRAME_SIZE: u32 = 1024;
/// Largest handshake frame a node accepts, whatever `max_frame_size` says.
pub const MAX_HELLO_SIZE: usize = 1024;
/// Longest `name` a hello may carry, in bytes (as in an announce).
pub const MAX_HELLO_NAME: usize = 64;
/// Largest encoding of a ping, pong or ack (see [`Frame::encode_fixed`]).
pub const MAX_FIXED: usize = LEN_PREFIX + 13;

/// Payloads up to this size are copied out of the read buffer instead of
/// sliced from it: one small allocation, where a slice would keep the read
/// buffer shared (and make the next read allocate a new one) for as long as
/// the application or the outbox holds the message.
const COPY_MAX: usize = 256;
const T_HELLO: u8 = 1;
const T_PING: u8 = 2;
const T_PONG: u8 = 3;
const T_DATA: u8 = 4;
const T_ACK: u8 = 5;
const T_GOODBYE: u8 = 6;
const T_REQUEST: u8 = 7;
const T_REPLY: u8 = 8;

/// Bytes a request or reply frame adds to its body: prefix, type byte and
/// the 8-byte request id.
pub const EXCHANGE_OVERHEAD: usize = DATA_OVERHEAD + 8;

/// The handshake, sent by both sides as their first frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Hello {
    /// Protocol version (see [`PROTOCOL_VERSION`](super::PROTOCOL_VERSION)).
    pub protocol: u8,
    /// Service name; must equal the receiver's.
    pub service: String,
    /// Sender id.
    pub id: PeerId,
    /// Sender instance.
    #[serde(with = "super::hex64")]
    pub instance: u64,
    /// Sender name.
    pub name: String,
    /// Sender role.
    pub role: Role,
    /// TCP port the sender accepts sessions on (0 for a controller).
    pub port: u16,
    /// How often the sender sends when idle, in milliseconds.
    pub heartbeat_interval_ms: u64,
    /// After how long without a frame the sender gives up, in milliseconds.
    pub heartbeat_timeout_ms: u64,
    /// Largest frame the sender accepts.
    pub max_frame_size: u32,
    /// UDP port the sender takes the session's liveness datagrams on
    /// (protocol 2, PROTOCOL.md §7); 0, or absent on the wire: none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub datagram_port: u16,
    /// How long the sender keeps a session's state after the session was
    /// cut, for the peer to resume it (protocol 2, PROTOCOL.md "Resuming a
    /// session"), in milliseconds; 0, or absent: it does not resume.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub grace_ms: u64,
    /// From the dialer: the token of the session it asks to resume. From
    /// the acceptor: the token of this session (the dialer's when it
    /// resumes, a new one when not). 0, or absent: none.
    #[serde(default, with = "super::hex64", skip_serializing_if = "is_zero_u64")]
    pub resume: u64,
    /// With `resume`, when resuming: how many data, request and reply
    /// frames the sender received on the session so far.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub received: u64,
}

fn is_zero(p: &u16) -> bool {
    *p == 0
}

fn is_zero_u64(p: &u64) -> bool {
    *p == 0
}

/// Only the version field of a handshake, read first so that a peer of
/// another version is refused clearly rather than as malformed.
#[derive(Deserialize)]
struct HelloVersion {
    protocol: u8,
}

/// The body of a goodbye frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct GoodbyeBody {
    /// Why the sender leaves, e.g. `"shutdown"`.
    pub reason: String,
}

/// One session frame.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Frame {
    /// Handshake; `Err(version)` when the peer speaks another protocol
    /// version (the rest was not parsed).
    Hello(Result<Box<Hello>, u8>),
    /// Heartbeat request.
    Ping {
        /// Sequence number, echoed by the pong.
        seq: u64,
        /// The sender's latest round-trip sample in microseconds, if it has
        /// one: a peer that does not ping itself reports it as its own.
        rtt_us: Option<u32>,
    },
    /// Heartbeat reply echoing the ping's sequence number.
    Pong(u64),
    /// An application message.
    Data(Bytes),
    /// Cumulative count of data frames received on this session so far.
    Ack(u64),
    /// The sender is closing the session on purpose.
    Goodbye(GoodbyeBody),
    /// A request the peer expects a reply to, under an id of its choosing.
    Request {
        /// The sender's id for the request, echoed by the reply.
        id: u64,
        /// The application's request.
        body: Bytes,
    },
    /// The reply to the request the receiver sent under `id`.
    Reply {
        /// The request's id.
        id: u64,
        /// The application's reply.
        body: Bytes,
    },
}

impl Frame {
    /// Appends the encoded frame to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        match self {
            Frame::Hello(Ok(h)) => json_frame(dst, T_HELLO, h),
            Frame::Hello(Err(v)) => json_frame(dst, T_HELLO, &serde_json::json!({"protocol": v})),
            Frame::Ping { seq, rtt_us } => put_fixed(dst, T_PING, *seq, *rtt_us),
            Frame::Pong(seq) => put_fixed(dst, T_PONG, *seq, None),
            Frame::Data(d) => encode_data(d, dst),
            Frame::Ack(count) => put_fixed(dst, T_ACK, *count, None),
            Frame::Goodbye(g) => json_frame(dst, T_GOODBYE, g),
            Frame::Request { id, body } => encode_exchange(T_REQUEST, *id, body, dst),
            Frame::Reply { id, body } => encode_exchange(T_REPLY, *id, body, dst),
        }
    }

    /// Encodes a heartbeat or an acknowledgement (frames of a few bytes,
    /// at most [`MAX_FIXED`]) into the front of `dst`, and returns its
    /// length; `None` for the other frames (left to [`Frame::encode`]). A
    /// driver can write such a frame without a heap buffer.
    ///
    /// # Panics
    /// If `dst` is shorter than [`MAX_FIXED`] and the frame is one of these.
    pub fn encode_fixed(&self, dst: &mut [u8]) -> Option<usize> {
        Some(match *self {
            Frame::Ping { seq, rtt_us } => write_fixed(dst, T_PING, seq, rtt_us),
            Frame::Pong(seq) => write_fixed(dst, T_PONG, seq, None),
            Frame::Ack(n) => write_fixed(dst, T_ACK, n, None),
            _ => return None,
        })
    }

    /// Takes one complete frame off the front of `buf`.
    ///
    /// Returns `Ok(None)` when `buf` does not yet hold a whole frame (and
    /// reserves room for the rest, at most `max` bytes). `max` is the largest
    /// frame accepted, type byte included.
    ///
    /// # Errors
    /// A [`FrameError`]; the stream cannot be resynchronised after one, so
    /// the session must close.
    pub fn decode(buf: &mut BytesMut, max: u32) -> Result<Option<Frame>, FrameError> {
        let Some(total) = frame_len(buf, max)? else {
            return Ok(None);
        };
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        let bytes = buf.split_to(total).freeze();
        Frame::parse(&bytes, 0, total).map(Some)
    }

    /// Parses the complete frame at `bytes[at..at + total]`, whose length
    /// prefix was checked. The payload of a data frame, and the body of a
    /// request or reply, is a slice of `bytes` (a copy if small, see [`COPY_MAX`]).
    fn parse(bytes: &Bytes, at: usize, total: usize) -> Result<Frame, FrameError> {
        let frame = &bytes[at..at + total];
        if let Some(parsed) = Frame::decode_control(frame) {
            return parsed;
        }
        let ty = frame[LEN_PREFIX];
        if ty == T_DATA {
            return Ok(Frame::Data(payload(bytes, at + DATA_OVERHEAD, at + total)));
        }
        if total < EXCHANGE_OVERHEAD {
            return Err(FrameError::Malformed(if ty == T_REQUEST {
                "request"
            } else {
                "reply"
            }));
        }
        let id = u64_at(&frame[DATA_OVERHEAD..]);
        let body = payload(bytes, at + EXCHANGE_OVERHEAD, at + total);
        Ok(match ty {
            T_REQUEST => Frame::Request { id, body },
            _ => Frame::Reply { id, body },
        })
    }

    /// Parses one complete frame, length prefix included (checked by the
    /// caller, e.g. with [`frame_len`]), unless it is a data, request or
    /// reply frame: `None` then, as its payload is to be a slice of a shared
    /// buffer, not a copy.
    /// This lets a driver handle the frames of an idle session (heartbeats,
    /// acks) straight from the bytes it read, with no buffer.
    pub fn decode_control(frame: &[u8]) -> Option<Result<Frame, FrameError>> {
        let body = &frame[DATA_OVERHEAD..];
        Some(Ok(match frame[LEN_PREFIX] {
            T_DATA | T_REQUEST | T_REPLY => return None,
            T_HELLO => {
                if body.len() > MAX_HELLO_SIZE {
                    return Some(Err(FrameError::Malformed("hello")));
                }
                let Ok(v) = serde_json::from_slice::<HelloVersion>(body) else {
                    return Some(Err(FrameError::Malformed("hello")));
                };
                if !super::KNOWN_VERSIONS.contains(&v.protocol) {
                    Frame::Hello(Err(v.protocol))
                } else {
                    match serde_json::from_slice::<Hello>(body) {
                        Ok(h) => Frame::Hello(Ok(Box::new(h))),
                        Err(_) => return Some(Err(FrameError::Malformed("hello"))),
                    }
                }
            }
            T_PING => match body.len() {
                8 | 12 => Frame::Ping {
                    seq: u64_at(body),
                    rtt_us: body
                        .get(8..12)
                        .map(|r| u32::from_be_bytes([r[0], r[1], r[2], r[3]])),
                },
                _ => return Some(Err(FrameError::Malformed("ping"))),
            },
            T_PONG if body.len() == 8 => Frame::Pong(u64_at(body)),
            T_PONG => return Some(Err(FrameError::Malformed("pong"))),
            T_ACK if body.len() == 8 => Frame::Ack(u64_at(body)),
            T_ACK => return Some(Err(FrameError::Malformed("ack"))),
            T_GOODBYE => match serde_json::from_slice(body) {
                Ok(g) => Frame::Goodbye(g),
                Err(_) => return Some(Err(FrameError::Malformed("goodbye"))),
            },
            other => return Some(Err(FrameError::UnknownType(other))),
        }))
    }

    /// Short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Hello(_) => "hello",
            Frame::Ping { .. } => "ping",
            Frame::Pong(_) => "pong",
            Frame::Data(_) => "data",
            Frame::Ack(_) => "ack",
            Frame::Goodbye(_) => "goodbye",
            Frame::Request { .. } => "request",
            Frame::Reply { .. } => "reply",
        }
    }
}

/// The checked total size (prefix included) of the frame at the front of
/// `buf`; `None` while its length prefix is incomplete.
pub fn frame_len(buf: &[u8], max: u32) -> Result<Option<usize>, FrameError> {
    let Some(prefix) = buf.get(..LEN_PREFIX) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max {
        return Err(FrameError::TooLarge {
            size: len,
            limit: max,
        });
    }
    Ok(Some(LEN_PREFIX + len as usize))
}

/// `bytes[from..to]`, a payload: copied if small (see [`COPY_MAX`]).
fn payload(bytes: &Bytes, from: usize, to: usize) -> Bytes {
    if to - from <= COPY_MAX {
        Bytes::copy_from_slice(&bytes[from..to])
    } else {
        bytes.slice(from..to)
    }
}

/// Complete frames taken off a read buffer in one split, then decoded one
/// by one: the receive path's alternative to calling [`Frame::decode`] per
/// frame, which splits the buffer once per frame. A data frame's payload is
/// a slice of the split-off bytes (a copy if small).
#[derive(Debug, Default)]
pub struct Frames {
    bytes: Bytes,
    pos: usize,
    /// A bad length prefix found after the complete frames: reported once
    /// they are decoded.
    error: Option<FrameError>,
}

impl Frames {
    /// Whether every frame taken was decoded (and any error reported).
    pub fn is_drained(&self) -> bool {
        self.pos == self.bytes.len() && self.error.is_none()
    }

    /// Takes every complete frame at the front of `buf` (checking each
    /// length against `max`, as [`Frame::decode`] does, and reserving room
    /// for the rest of an incomplete one). Returns whether there is now
    /// anything to decode. Call only when the iterator gave `None`.
    pub fn fill(&mut self, buf: &mut BytesMut, max: u32) -> bool {
        debug_assert!(self.bytes.len() == self.pos && self.error.is_none());
        if buf.is_empty() {
            return false;
        }
        let mut end = 0;
        let mut missing = 0;
        loop {
            match frame_len(&buf[end..], max) {
                Ok(Some(total)) if buf.len() - end >= total => end += total,
                Ok(Some(total)) => {
                    missing = total - (buf.len() - end);
                    break;
                }
                Ok(None) => break,
                Err(e) => {
                    self.error = Some(e);
                    break;
                }
            }
        }
        self.bytes = if end > 0 {
            buf.split_to(end).freeze()
        } else {
            Bytes::new()
        };
        self.pos = 0;
        // Only once the complete frames are gone: reserving before would
        // copy them into the new allocation too.
        buf.reserve(missing);
        end > 0 || self.error.is_some()
    }
}

/// The frames taken by [`Frames::fill`]; after them, the error found behind
/// them, if any. The first error ends the iteration (nothing more is
/// yielded): the session must close.
impl Iterator for Frames {
    type Item = Result<Frame, FrameError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos == self.bytes.len() {
            // Let go of the read buffer as soon as its frames are decoded.
            if !self.bytes.is_empty() {
                self.bytes = Bytes::new();
                self.pos = 0;
            }
            return self.error.take().map(Err);
        }
        let at = self.pos;
        let b = &self.bytes;
        let total =
            LEN_PREFIX + u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize;
        self.pos += total;
        let parsed = Frame::parse(&self.bytes, at, total);
        if parsed.is_err() {
            // Nothing after an error: the session closes on it.
            *self = Frames::default();
        }
        Some(parsed)
    }
}

/// Appends a data frame carrying `payload` to `dst`.
pub fn encode_data(payload: &[u8], dst: &mut BytesMut) {
    dst.reserve(DATA_OVERHEAD + payload.len());
    encode_data_header(payload.len(), dst);
    dst.put_slice(payload);
}

/// Appends the header of a data frame whose payload is `len` bytes (the
/// payload follows it on the wire).
pub fn encode_data_header(len: usize, dst: &mut BytesMut) {
    dst.put_u32((len + 1) as u32);
    dst.put_u8(T_DATA);
}

/// Appends a request or reply frame (type `ty`) for request `id` to `dst`.
fn encode_exchange(ty: u8, id: u64, body: &[u8], dst: &mut BytesMut) {
    dst.reserve(EXCHANGE_OVERHEAD + body.len());
    dst.put_u32((body.len() + 9) as u32);
    dst.put_u8(ty);
    dst.put_u64(id);
    dst.put_slice(body);
}

/// A request frame for request `id`, encoded: what a session's outbox
/// keeps, and hands back whole if the session ends first.
pub fn request_frame(id: u64, body: &[u8]) -> Bytes {
    let mut b = BytesMut::new();
    encode_exchange(T_REQUEST, id, body, &mut b);
    b.freeze()
}

/// A reply frame to request `id`, encoded (see [`request_frame`]).
pub fn reply_frame(id: u64, body: &[u8]) -> Bytes {
    let mut b = BytesMut::new();
    encode_exchange(T_REPLY, id, body, &mut b);
    b.freeze()
}

/// What an encoded request or reply frame (from [`request_frame`] or
/// [`reply_frame`]) is: `Some((true, id, body))` for a request,
/// `Some((false, ..))` for a reply, `None` for anything else.
pub fn exchange_parts(frame: &Bytes) -> Option<(bool, u64, Bytes)> {
    if frame.len() < EXCHANGE_OVERHEAD {
        return None;
    }
    let request = match frame[LEN_PREFIX] {
        T_REQUEST => true,
        T_REPLY => false,
        _ => return None,
    };
    let id = u64_at(&frame[DATA_OVERHEAD..]);
    Some((request, id, frame.slice(EXCHANGE_OVERHEAD..)))
}

/// Application messages on their way to the peer, in the unit a session
/// takes them from its outbox and keeps them until they are acknowledged.
///
/// Small messages are encoded when they are sent, back to back into one
/// buffer (`Frames`): from then on a run of them moves, is written and is
/// acknowledged as one piece, with no per-message work. Large ones stay as
/// the application gave them (`Message`) and are encoded only into the
/// write buffer. Either way a message can be handed back as it was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outgoing {
    /// `count` data frames, encoded back to back (each length prefix
    /// covers the kind byte and the payload; see [`encode_data`]).
    Frames {
        /// The frames, as they go on the wire.
        wire: Bytes,
        /// How many.
        count: usize,
    },
    /// One message, not encoded yet.
    Message(Bytes),
    /// One request or reply frame, encoded (see [`request_frame`]).
    Exchange(Bytes),
}

impl Outgoing {
    /// Messages carried.
    pub fn count(&self) -> usize {
        match self {
            Outgoing::Frames { count, .. } => *count,
            Outgoing::Message(_) | Outgoing::Exchange(_) => 1,
        }
    }

    /// Bytes it takes on the wire.
    pub fn wire_len(&self) -> usize {
        match self {
            Outgoing::Frames { wire, .. } | Outgoing::Exchange(wire) => wire.len(),
            Outgoing::Message(m) => DATA_OVERHEAD + m.len(),
        }
    }

    /// Appends its frames to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        match self {
            Outgoing::Frames { wire, .. } | Outgoing::Exchange(wire) => dst.extend_from_slice(wire),
            Outgoing::Message(m) => encode_data(m, dst),
        }
    }

    /// Splits off the first `n` messages (fewer if it carries fewer) and
    /// returns them; `self` keeps the rest.
    pub fn split_to(&mut self, n: usize) -> Outgoing {
        match self {
            _ if n == 0 => Outgoing::Frames {
                wire: Bytes::new(),
                count: 0,
            },
            Outgoing::Frames { wire, count } if n < *count => {
                let at = frame_offset(wire, n);
                *count -= n;
                Outgoing::Frames {
                    wire: wire.split_to(at),
                    count: n,
                }
            }
            _ => std::mem::replace(
                self,
                Outgoing::Frames {
                    wire: Bytes::new(),
                    count: 0,
                },
            ),
        }
    }

    /// How many of its messages fit in `bytes` on the wire: at least one
    /// (one message may pass a limit), at most all.
    pub fn count_within(&self, bytes: usize) -> usize {
        match self {
            Outgoing::Frames { wire, count } if wire.len() > bytes => {
                let (mut at, mut n) = (0, 0);
                while n < *count {
                    let next = at + LEN_PREFIX + run_frame_len(wire, at);
                    if next > bytes {
                        break;
                    }
                    (at, n) = (next, n + 1);
                }
                n.max(1)
            }
            other => other.count(),
        }
    }

    /// Appends the messages it carries, as they were sent (slices, not
    /// copies), to `out`; a request or reply frame goes to `exchanges`,
    /// encoded.
    pub fn into_messages(self, out: &mut Vec<Bytes>, exchanges: &mut Vec<Bytes>) {
        match self {
            Outgoing::Exchange(frame) => exchanges.push(frame),
            Outgoing::Frames { wire, count } => {
                out.reserve(count);
                let mut at = 0;
                for _ in 0..count {
                    let len = run_frame_len(&wire, at);
                    out.push(wire.slice(at + DATA_OVERHEAD..at + LEN_PREFIX + len));
                    at += LEN_PREFIX + len;
                }
            }
            Outgoing::Message(m) => out.push(m),
        }
    }
}

/// The length prefix of the frame at `at` in a run of data frames.
fn run_frame_len(wire: &[u8], at: usize) -> usize {
    let prefix: [u8; LEN_PREFIX] = wire[at..at + LEN_PREFIX]
        .try_into()
        .expect("a run holds whole frames");
    u32::from_be_bytes(prefix) as usize
}

/// Where the `n`th frame of a run of data frames starts.
fn frame_offset(wire: &[u8], n: usize) -> usize {
    (0..n).fold(0, |at, _| at + LEN_PREFIX + run_frame_len(wire, at))
}

/// Appends what [`write_fixed`] writes to `dst`.
fn put_fixed(dst: &mut BytesMut, ty: u8, v: u64, rtt: Option<u32>) {
    let mut fixed = [0; MAX_FIXED];
    let n = write_fixed(&mut fixed, ty, v, rtt);
    dst.extend_from_slice(&fixed[..n]);
}

/// Writes a frame of type `ty` whose payload is `v` (and `rtt`, for a
/// ping reporting one) to the front of `dst`; returns its length.
fn write_fixed(dst: &mut [u8], ty: u8, v: u64, rtt: Option<u32>) -> usize {
    let len = 9 + if rtt.is_some() { 4 } else { 0 };
    dst[..LEN_PREFIX].copy_from_slice(&(len as u32).to_be_bytes());
    dst[LEN_PREFIX] = ty;
    dst[LEN_PREFIX + 1..LEN_PREFIX + 9].copy_from_slice(&v.to_be_bytes());
    if let Some(rtt) = rtt {
        dst[LEN_PREFIX + 9..LEN_PREFIX + 13].copy_from_slice(&rtt.to_be_bytes());
    }
    LEN_PREFIX + len
}

fn json_frame<T: Serialize>(dst: &mut BytesMut, ty: u8, v: &T) {
    let body = serde_json::to_vec(v).expect("serializing strings and numbers cannot fail");
    dst.reserve(DATA_OVERHEAD + body.len());
    dst.put_u32((body.len() + 1) as u32);
    dst.put_u8(ty);
    dst.put_slice(&body);
}

/// The big-endian `u64` at the front of `body` (at least 8 bytes).
fn u64_at(body: &[u8]) -> u64 {
    let mut b = [0; 8];
    b.copy_from_slice(&body[..8]);
    u64::from_be_bytes(b)
}

#[cfg(test)]
mod tests;
