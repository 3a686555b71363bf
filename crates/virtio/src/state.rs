//! Saved device state: one versioned blob format for every device.
//!
//! A blob is a fixed header (magic, format version, device type, compat version, payload length,
//! CRC-32 of the payload) followed by the payload: the framework's spec-level facts
//! ([`FrameworkState`]: negotiated features, status, each queue's size and position) and the
//! device's own bytes. The whole blob is capped at [`MAX_STATE_SIZE`]; there is no per-field
//! versioning. Decoding checks everything before anything is applied, and applying checks the
//! facts against the destination's configuration again (see `Framework::load_state`).
//!
//! [`StateWriter`] and [`StateReader`] are the one little-endian codec devices use for their own
//! payloads, so that a truncated or overlong payload is always an error and never a panic.

/// The first bytes of every blob.
pub const STATE_MAGIC: [u8; 8] = *b"OBSTATE\0";
/// The blob format this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// The largest blob accepted.
pub const MAX_STATE_SIZE: usize = 1 << 20;

const HEADER_LEN: usize = 8 + 2 + 4 + 2 + 4 + 4;

/// Why a blob was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    /// Not a state blob.
    #[error("not an Outboard state blob (bad magic)")]
    BadMagic,
    /// A format this build cannot read.
    #[error("state format {found} is not supported (this build reads format {FORMAT_VERSION})")]
    Format {
        /// The blob's format.
        found: u16,
    },
    /// The blob is larger than allowed.
    #[error("state blob of {size} bytes exceeds the {MAX_STATE_SIZE}-byte limit")]
    TooLarge {
        /// Its size.
        size: usize,
    },
    /// The blob ends early or has bytes left over.
    #[error("state blob is truncated or has trailing bytes: {detail}")]
    Length {
        /// What was wrong.
        detail: String,
    },
    /// The payload does not match its checksum.
    #[error("state blob checksum mismatch (corrupted)")]
    Checksum,
    /// The blob was saved by another kind of device.
    #[error("state is for device type {found}, this device is type {expected}")]
    DeviceType {
        /// The blob's device type.
        found: u32,
        /// This device's type.
        expected: u32,
    },
    /// The blob's compat version cannot be loaded here.
    #[error(
        "state compat version {found} cannot be loaded by this backend (it accepts {accepted:?})"
    )]
    CompatVersion {
        /// The blob's compat version.
        found: u16,
        /// What this backend accepts.
        accepted: Vec<u16>,
    },
    /// A field holds a value that is invalid or does not match this configuration.
    #[error("state field {field}: {detail}")]
    Field {
        /// The field.
        field: &'static str,
        /// What was wrong.
        detail: String,
    },
}

impl StateError {
    /// A field error.
    pub fn field(field: &'static str, detail: impl Into<String>) -> Self {
        StateError::Field {
            field,
            detail: detail.into(),
        }
    }
}

/// Appends little-endian fields to a payload.
#[derive(Debug, Default)]
pub struct StateWriter {
    buf: Vec<u8>,
}

impl StateWriter {
    /// An empty payload.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    /// Appends a u16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a bool as one byte.
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(u8::from(v))
    }

    /// Appends a length-prefixed byte string.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(v.len() as u32);
        self.buf.extend_from_slice(v);
        self
    }

    /// The payload.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads little-endian fields from a payload; every read checks the length.
#[derive(Debug)]
pub struct StateReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> StateReader<'a> {
    /// Reads `buf` from the start.
    pub fn new(buf: &'a [u8]) -> Self {
        StateReader { buf, pos: 0 }
    }

    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], StateError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            return Err(StateError::Length {
                detail: format!("{field} needs {n} bytes at offset {}", self.pos),
            });
        };
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// Reads a byte.
    pub fn u8(&mut self, field: &'static str) -> Result<u8, StateError> {
        Ok(self.take(1, field)?[0])
    }

    /// Reads a u16.
    pub fn u16(&mut self, field: &'static str) -> Result<u16, StateError> {
        let b = self.take(2, field)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    /// Reads a u32.
    pub fn u32(&mut self, field: &'static str) -> Result<u32, StateError> {
        let b = self.take(4, field)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Reads a u64.
    pub fn u64(&mut self, field: &'static str) -> Result<u64, StateError> {
        let b = self.take(8, field)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// Reads a bool written by [`StateWriter::bool`]; any byte but 0 or 1 is an error.
    pub fn bool(&mut self, field: &'static str) -> Result<bool, StateError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(StateError::field(field, format!("{v} is not a boolean"))),
        }
    }

    /// Reads a length-prefixed byte string of at most `max` bytes.
    pub fn bytes(&mut self, field: &'static str, max: usize) -> Result<&'a [u8], StateError> {
        let n = self.u32(field)? as usize;
        if n > max {
            return Err(StateError::field(
                field,
                format!("{n} bytes exceed the limit of {max}"),
            ));
        }
        self.take(n, field)
    }

    /// Checks that every byte was read.
    pub fn finish(self) -> Result<(), StateError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(StateError::Length {
                detail: format!("{} trailing bytes", self.buf.len() - self.pos),
            })
        }
    }
}

/// A queue's spec-level state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueState {
    /// The size the driver chose.
    pub size: u16,
    /// The next available index the device will read.
    pub next_avail: u16,
    /// Whether the queue was enabled.
    pub enabled: bool,
}

/// The framework's spec-level facts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameworkState {
    /// The features the driver acknowledged.
    pub acked_features: u64,
    /// The device status byte.
    pub status: u8,
    /// Each queue, in index order.
    pub queues: Vec<QueueState>,
}

/// A whole saved state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedState {
    /// The VIRTIO device type ID.
    pub device_type: u32,
    /// The compat version the state was written for.
    pub compat_version: u16,
    /// The framework's facts.
    pub framework: FrameworkState,
    /// The device's own payload.
    pub device: Vec<u8>,
}

impl SavedState {
    /// Encodes the blob.
    pub fn encode(&self) -> Result<Vec<u8>, StateError> {
        let mut w = StateWriter::new();
        w.u64(self.framework.acked_features)
            .u8(self.framework.status)
            .u16(self.framework.queues.len() as u16);
        for q in &self.framework.queues {
            w.u16(q.size).u16(q.next_avail).bool(q.enabled);
        }
        w.bytes(&self.device);
        let payload = w.finish();
        let size = HEADER_LEN + payload.len();
        if size > MAX_STATE_SIZE {
            return Err(StateError::TooLarge { size });
        }
        let mut out = Vec::with_capacity(size);
        out.extend_from_slice(&STATE_MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&self.device_type.to_le_bytes());
        out.extend_from_slice(&self.compat_version.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        Ok(out)
    }

    /// Decodes and checks a blob: magic, format, size, checksum and structure. The facts are
    /// checked against a configuration when the state is applied.
    pub fn decode(blob: &[u8]) -> Result<SavedState, StateError> {
        if blob.len() > MAX_STATE_SIZE {
            return Err(StateError::TooLarge { size: blob.len() });
        }
        let mut r = StateReader::new(blob);
        if r.take(8, "magic")? != STATE_MAGIC {
            return Err(StateError::BadMagic);
        }
        let format = r.u16("format")?;
        if format != FORMAT_VERSION {
            return Err(StateError::Format { found: format });
        }
        let device_type = r.u32("device type")?;
        let compat_version = r.u16("compat version")?;
        let len = r.u32("payload length")? as usize;
        let crc = r.u32("checksum")?;
        let payload = r.take(len, "payload")?;
        r.finish()?;
        if crc32fast::hash(payload) != crc {
            return Err(StateError::Checksum);
        }
        let mut p = StateReader::new(payload);
        let acked_features = p.u64("acked features")?;
        let status = p.u8("status")?;
        let count = p.u16("queue count")?;
        let mut queues = Vec::with_capacity(usize::from(count).min(1024));
        for _ in 0..count {
            queues.push(QueueState {
                size: p.u16("queue size")?,
                next_avail: p.u16("queue next_avail")?,
                enabled: p.bool("queue enabled")?,
            });
        }
        let device = p.bytes("device payload", MAX_STATE_SIZE)?.to_vec();
        p.finish()?;
        Ok(SavedState {
            device_type,
            compat_version,
            framework: FrameworkState {
                acked_features,
                status,
                queues,
            },
            device,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SavedState {
        SavedState {
            device_type: 2,
            compat_version: 1,
            framework: FrameworkState {
                acked_features: 1 << 32 | 1 << 29,
                status: 0xf,
                queues: vec![
                    QueueState {
                        size: 256,
                        next_avail: 17,
                        enabled: true,
                    },
                    QueueState {
                        size: 128,
                        next_avail: 65535,
                        enabled: false,
                    },
                ],
            },
            device: vec![1, 2, 3],
        }
    }

    #[test]
    fn blobs_round_trip() {
        let s = sample();
        assert_eq!(SavedState::decode(&s.encode().unwrap()).unwrap(), s);
    }

    #[test]
    fn damaged_blobs_are_refused() {
        let blob = sample().encode().unwrap();
        let mut bad = blob.clone();
        bad[0] ^= 1;
        assert_eq!(SavedState::decode(&bad), Err(StateError::BadMagic));
        let mut bad = blob.clone();
        bad[8] = 9;
        assert_eq!(
            SavedState::decode(&bad),
            Err(StateError::Format { found: 9 })
        );
        let mut bad = blob.clone();
        *bad.last_mut().unwrap() ^= 0x80;
        assert_eq!(SavedState::decode(&bad), Err(StateError::Checksum));
        for cut in [0, 5, HEADER_LEN, blob.len() - 1] {
            assert!(SavedState::decode(&blob[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = blob.clone();
        long.push(0);
        assert!(matches!(
            SavedState::decode(&long),
            Err(StateError::Length { .. })
        ));
        assert!(matches!(
            SavedState::decode(&vec![0; MAX_STATE_SIZE + 1]),
            Err(StateError::TooLarge { .. })
        ));
    }

    #[test]
    fn reader_checks_every_field() {
        let mut w = StateWriter::new();
        w.bool(true).u8(7).bytes(&[9; 4]);
        let buf = w.finish();
        let mut r = StateReader::new(&buf);
        assert!(r.bool("a").unwrap());
        assert!(r.bool("b").is_err());
        assert!(StateReader::new(&buf[2..]).bytes("c", 3).is_err());
    }
}
