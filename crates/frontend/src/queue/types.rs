//! Plain types of the driver-side queue: descriptors, segments, modes, counters.

use std::sync::atomic::Ordering;

use vhost::vhost_user::message::VhostUserVringAddrFlags;
use vhost::VringConfigData;
use vmm_sys_util::eventfd::EventFd;

use crate::ram::GuestBuf;

use super::DESC_SIZE;

/// A raw split-ring descriptor, exactly as written to the table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawDescriptor {
    /// Guest physical address of the buffer.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// `VRING_DESC_F_*` flags.
    pub flags: u16,
    /// Next descriptor index (valid with `VRING_DESC_F_NEXT`).
    pub next: u16,
}

impl RawDescriptor {
    /// The 16 little-endian bytes of the descriptor.
    pub fn to_bytes(&self) -> [u8; DESC_SIZE] {
        let mut b = [0u8; DESC_SIZE];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }

    /// Decodes 16 bytes.
    pub fn from_bytes(b: &[u8; DESC_SIZE]) -> Self {
        RawDescriptor {
            addr: u64::from_le_bytes(b[0..8].try_into().expect("8 bytes")),
            len: u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")),
            flags: u16::from_le_bytes([b[12], b[13]]),
            next: u16::from_le_bytes([b[14], b[15]]),
        }
    }
}

/// One buffer of a chain: device-readable or device-writable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u32,
    /// Whether the device writes it (`VRING_DESC_F_WRITE`).
    pub writable: bool,
}

impl Segment {
    /// The whole of `buf`, read by the device.
    pub fn readable(buf: &GuestBuf) -> Self {
        Self::readable_part(buf, 0, buf.len())
    }

    /// The whole of `buf`, written by the device.
    pub fn writable(buf: &GuestBuf) -> Self {
        Self::writable_part(buf, 0, buf.len())
    }

    /// `[offset, offset+len)` of `buf`, read by the device.
    pub fn readable_part(buf: &GuestBuf, offset: usize, len: usize) -> Self {
        let b = buf.slice(offset, len);
        Segment {
            gpa: b.gpa(),
            len: len as u32,
            writable: false,
        }
    }

    /// `[offset, offset+len)` of `buf`, written by the device.
    pub fn writable_part(buf: &GuestBuf, offset: usize, len: usize) -> Self {
        Segment {
            writable: true,
            ..Self::readable_part(buf, offset, len)
        }
    }
}

/// Whether the driver asks the device for used-buffer notifications (interrupts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotifyMode {
    /// Ask for a notification for every completion (`used_event` = last seen used index, or
    /// avail flags 0); needed to sleep on the call eventfd.
    Interrupt,
    /// Suppress notifications (`VRING_AVAIL_F_NO_INTERRUPT`, or `used_event` kept half a ring
    /// ahead); the driver busy-polls the used ring.
    Poll,
}

/// Which addresses SET_VRING_ADDR carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingAddressing {
    /// The frontend's own mapping addresses, as QEMU sends without GPA_ADDRESSES or an IOMMU.
    UserAddress,
    /// Guest physical addresses (for backends that negotiated GPA_ADDRESSES).
    GuestPhysical,
}

/// Parameters of a [`DriverQueue`](super::DriverQueue).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// Number of descriptors (power of two, at most 32768).
    pub size: u16,
    /// Whether VIRTIO_RING_F_EVENT_IDX was negotiated.
    pub event_idx: bool,
    /// Descriptors per indirect table; 0 disables indirect chains.
    pub indirect_max: u16,
    /// Notification mode.
    pub notify: NotifyMode,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            size: 256,
            event_idx: false,
            indirect_max: 0,
            notify: NotifyMode::Interrupt,
        }
    }
}

/// A used-ring element: the head id and the number of bytes the device wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    /// Head descriptor index of the completed chain.
    pub id: u32,
    /// Bytes written by the device.
    pub len: u32,
}

/// Counters of one queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Chains added (direct, indirect and raw heads).
    pub chains_added: u64,
    /// Kick eventfd writes.
    pub kicks: u64,
    /// Notifications skipped because the device suppressed them.
    pub kicks_suppressed: u64,
    /// Completions reaped.
    pub completions: u64,
    /// Sleeps on the call eventfd.
    pub interrupt_waits: u64,
    /// Busy-poll iterations that found the used ring empty (time spent waiting for the
    /// device rather than working).
    pub empty_polls: u64,
}

/// What SET_VRING_* needs to (re)start a queue on a backend, independent of who owns the
/// [`DriverQueue`](super::DriverQueue).
#[derive(Debug)]
pub struct VringSetup {
    /// Queue index.
    pub index: u16,
    /// Queue size.
    pub size: u16,
    /// Descriptor table, avail ring and used ring addresses (as sent).
    pub desc_addr: u64,
    /// Avail ring address.
    pub avail_addr: u64,
    /// Used ring address.
    pub used_addr: u64,
    /// A dup of the kick eventfd.
    pub kick: EventFd,
    /// A dup of the call eventfd.
    pub call: EventFd,
    /// The avail ring's `idx` field, to read the driver's position when restarting a ring.
    pub(super) avail_idx: GuestBuf,
    /// The used ring's `idx` field, where a ring restarts after its backend crashed.
    pub(super) used_idx: GuestBuf,
}

impl VringSetup {
    /// The configuration for SET_VRING_ADDR.
    pub fn config(&self) -> VringConfigData {
        VringConfigData {
            queue_max_size: self.size,
            queue_size: self.size,
            flags: VhostUserVringAddrFlags::empty().bits(),
            desc_table_addr: self.desc_addr,
            used_ring_addr: self.used_addr,
            avail_ring_addr: self.avail_addr,
            log_addr: None,
        }
    }

    /// The avail index the driver has published (where a quiesced ring restarts).
    pub fn published_avail_idx(&self) -> u16 {
        self.avail_idx.load_u16(0, Ordering::Acquire)
    }

    /// The used index the device has published (where a ring restarts after a crash: the
    /// backend finds what was in flight beyond it in its inflight region).
    pub fn published_used_idx(&self) -> u16 {
        u16::from_le(self.used_idx.load_u16(0, Ordering::Acquire))
    }
}
