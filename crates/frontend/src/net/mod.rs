//! A virtio-net driver on top of a [`Session`].
//!
//! [`NetDriver::connect`] negotiates, reads the config space, and sets up the queues the way a
//! guest driver does: a receive and a transmit queue per queue pair in use, and the control
//! queue at index `2 × max_virtqueue_pairs`. Each receive queue is kept full of buffers
//! ([`NetRxQueue`], with or without `VIRTIO_NET_F_MRG_RXBUF`), each transmit queue sends
//! frames behind a `virtio_net_hdr` ([`NetTxQueue`]), and the control queue sends commands and
//! returns the device's ack ([`NetCtrlQueue`]).

mod ctrl;
mod rx;
mod tx;

pub use ctrl::{CtrlAck, NetCtrlQueue, RxMode};
pub use rx::{NetRxQueue, RxPacket};
pub use tx::NetTxQueue;

use std::time::Duration;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use crate::device::{SessionBuilder, SessionError, DEFAULT_FEATURES};
use crate::queue::{DriverQueue, NotifyMode, QueueConfig, QueueError};
use crate::ram::RamError;
use crate::Session;

const DEVICE_NEEDS_RESET: u8 = VIRTIO_CONFIG_S_NEEDS_RESET as u8;

/// The size of `struct virtio_net_hdr_v1` (with `num_buffers`), as VERSION_1 requires.
pub const NET_HDR_LEN: usize = 12;

/// virtio-net features a [`NetDriver`] asks for by default, on top of [`DEFAULT_FEATURES`].
pub const NET_FEATURES: u64 = DEFAULT_FEATURES
    | 1 << VIRTIO_NET_F_CSUM
    | 1 << VIRTIO_NET_F_GUEST_CSUM
    | 1 << VIRTIO_NET_F_MTU
    | 1 << VIRTIO_NET_F_MAC
    | 1 << VIRTIO_NET_F_GUEST_TSO4
    | 1 << VIRTIO_NET_F_GUEST_TSO6
    | 1 << VIRTIO_NET_F_GUEST_ECN
    | 1 << VIRTIO_NET_F_HOST_TSO4
    | 1 << VIRTIO_NET_F_HOST_TSO6
    | 1 << VIRTIO_NET_F_HOST_ECN
    | 1 << VIRTIO_NET_F_MRG_RXBUF
    | 1 << VIRTIO_NET_F_STATUS
    | 1 << VIRTIO_NET_F_CTRL_VQ
    | 1 << VIRTIO_NET_F_CTRL_RX
    | 1 << VIRTIO_NET_F_CTRL_VLAN
    | 1 << VIRTIO_NET_F_CTRL_RX_EXTRA
    | 1 << VIRTIO_NET_F_GUEST_ANNOUNCE
    | 1 << VIRTIO_NET_F_MQ
    | 1 << VIRTIO_NET_F_CTRL_MAC_ADDR;

/// Errors of the virtio-net driver.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Session setup or a control message failed.
    #[error("vhost-user session")]
    Session(#[from] SessionError),
    /// A queue operation failed (including timeouts).
    #[error("virtqueue")]
    Queue(#[from] QueueError),
    /// Allocating buffers failed.
    #[error("guest RAM")]
    Ram(#[from] RamError),
    /// The CONFIG protocol feature was not negotiated, so the config cannot be read.
    #[error("the backend did not negotiate the CONFIG protocol feature")]
    NoConfig,
    /// The config space is shorter than `struct virtio_net_config` up to `mtu`.
    #[error("config space of {0} bytes is too short")]
    ShortConfig(usize),
    /// The device has a different number of queue pairs than the driver was told.
    #[error("the device has {device} queue pairs, the driver was set up for {expected}")]
    PairsMismatch {
        /// `max_virtqueue_pairs` (1 without MQ).
        device: u16,
        /// [`NetOptions::max_pairs`].
        expected: u16,
    },
    /// No such queue pair is set up.
    #[error("queue pair {0} is not set up")]
    NoPair(u16),
    /// The control queue was not negotiated.
    #[error("the control queue was not negotiated")]
    NoCtrl,
    /// A frame or command does not fit the driver's buffers.
    #[error("{len} bytes do not fit a {max}-byte buffer")]
    TooLarge {
        /// Bytes given.
        len: usize,
        /// Buffer size.
        max: usize,
    },
    /// The device returned something a driver cannot accept.
    #[error("queue {queue}: {reason}")]
    Device {
        /// The queue.
        queue: u16,
        /// What was wrong.
        reason: String,
    },
}

/// `struct virtio_net_hdr_v1`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetHdr {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`.
    pub gso_type: u8,
    /// Header length hint for GSO.
    pub hdr_len: u16,
    /// Segment payload size for GSO.
    pub gso_size: u16,
    /// Where checksumming starts (`NEEDS_CSUM`).
    pub csum_start: u16,
    /// Offset of the checksum from `csum_start`.
    pub csum_offset: u16,
    /// Buffers the packet spans (receive side).
    pub num_buffers: u16,
}

impl NetHdr {
    /// The wire bytes.
    pub fn to_bytes(self) -> [u8; NET_HDR_LEN] {
        let mut b = [0u8; NET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }

    /// Reads the wire bytes.
    pub fn from_bytes(b: &[u8; NET_HDR_LEN]) -> Self {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        NetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: u16_at(10),
        }
    }
}

/// `struct virtio_net_config` as far as this driver reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetConfig {
    /// The MAC address (`VIRTIO_NET_F_MAC`).
    pub mac: [u8; 6],
    /// `VIRTIO_NET_S_*` (`VIRTIO_NET_F_STATUS`).
    pub status: u16,
    /// Queue pairs (`VIRTIO_NET_F_MQ`).
    pub max_virtqueue_pairs: u16,
    /// The MTU (`VIRTIO_NET_F_MTU`).
    pub mtu: u16,
    /// The raw bytes read.
    pub raw: Vec<u8>,
}

impl NetConfig {
    /// The length read: through `mtu`.
    pub const LEN: usize = 12;

    /// Parses config bytes.
    pub fn parse(raw: &[u8]) -> Result<Self, NetError> {
        if raw.len() < Self::LEN {
            return Err(NetError::ShortConfig(raw.len()));
        }
        let u16_at = |i: usize| u16::from_le_bytes([raw[i], raw[i + 1]]);
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&raw[..6]);
        Ok(NetConfig {
            mac,
            status: u16_at(6),
            max_virtqueue_pairs: u16_at(8),
            mtu: u16_at(10),
            raw: raw.to_vec(),
        })
    }
}

/// Options of a [`NetDriver`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetOptions {
    /// The device's queue pairs (its `--queue-pairs`): the control queue is after all of them.
    pub max_pairs: u16,
    /// Queue pairs to set up (at most `max_pairs`).
    pub pairs: u16,
    /// Send `VQ_PAIRS_SET(pairs)` after setup when MQ is negotiated, as Linux does.
    pub set_pairs: bool,
    /// Descriptors per queue.
    pub queue_size: u16,
    /// Receive buffers kept posted on each receive queue.
    pub rx_buffers: u16,
    /// Size of each receive buffer; `None`: 2 KiB with mergeable buffers, else 64 KiB and the
    /// header with guest TSO, 2 KiB without.
    pub rx_buffer_size: Option<usize>,
    /// Transmit slots per transmit queue.
    pub tx_slots: u16,
    /// How completions are waited for.
    pub notify: NotifyMode,
    /// How long synchronous helpers wait.
    pub timeout: Duration,
}

impl Default for NetOptions {
    fn default() -> Self {
        NetOptions {
            max_pairs: 1,
            pairs: 1,
            set_pairs: true,
            queue_size: 256,
            rx_buffers: 128,
            rx_buffer_size: None,
            tx_slots: 64,
            notify: NotifyMode::Interrupt,
            timeout: Duration::from_secs(10),
        }
    }
}

/// A virtio-net driver: the config and the queues it set up.
#[derive(Debug)]
pub struct NetDriver {
    session: Session,
    config: NetConfig,
    rx: Vec<NetRxQueue>,
    tx: Vec<NetTxQueue>,
    ctrl: Option<NetCtrlQueue>,
    opts: NetOptions,
}

impl NetDriver {
    /// Sets up a session (asking for [`NET_FEATURES`] unless the builder names features; the
    /// queue count and size come from `opts`) and the driver.
    pub fn connect(builder: SessionBuilder, opts: NetOptions) -> Result<Self, NetError> {
        let features = builder.features_or(NET_FEATURES);
        let builder = builder
            .features(features)
            .queues(opts.max_pairs * 2 + 1)
            .queue_size(opts.queue_size);
        let mut session = builder.handshake()?;
        let config = read_config(&mut session)?;
        let n = *session.negotiated();
        let has = |bit: u32| n.has_feature(bit);
        let device_pairs = if has(VIRTIO_NET_F_MQ) {
            config.max_virtqueue_pairs
        } else {
            1
        };
        if device_pairs != opts.max_pairs && has(VIRTIO_NET_F_MQ) {
            return Err(NetError::PairsMismatch {
                device: device_pairs,
                expected: opts.max_pairs,
            });
        }
        let cfg = QueueConfig {
            size: opts.queue_size,
            event_idx: has(VIRTIO_RING_F_EVENT_IDX),
            indirect_max: 0,
            notify: opts.notify,
        };
        let mrg = has(VIRTIO_NET_F_MRG_RXBUF);
        let tso = has(VIRTIO_NET_F_GUEST_TSO4) || has(VIRTIO_NET_F_GUEST_TSO6);
        let buffer = opts.rx_buffer_size.unwrap_or(if mrg || !tso {
            2048
        } else {
            65536 + NET_HDR_LEN
        });
        let pairs = opts.pairs.min(opts.max_pairs).max(1);
        let mut indices: Vec<u16> = (0..pairs * 2).collect();
        let ctrl_index = has(VIRTIO_NET_F_CTRL_VQ).then_some(device_pairs * 2);
        indices.extend(ctrl_index);
        for &i in &indices {
            let q = DriverQueue::new(session.ram_mut(), i, cfg)?;
            session.add_queue(q)?;
            session.start_queue(i, 0)?;
        }
        session.driver_ok()?;
        // Messages without a reply are asynchronous: a round trip makes sure the device runs
        // (and so receives) when `connect` returns.
        if n.has_protocol(VhostUserProtocolFeatures::STATUS) {
            let status = session.get_status()?;
            if status & DEVICE_NEEDS_RESET != 0 {
                return Err(NetError::Device {
                    queue: 0,
                    reason: format!(
                        "the device needs a reset after DRIVER_OK (status {status:#x})"
                    ),
                });
            }
        } else {
            read_config(&mut session)?;
        }
        let take = |session: &mut Session, i: u16| {
            session
                .take_queue(i)
                .ok_or(NetError::Session(SessionError::NoQueue(i)))
        };
        let mut rx = Vec::new();
        let mut tx = Vec::new();
        for p in 0..pairs {
            let rq = take(&mut session, p * 2)?;
            rx.push(NetRxQueue::new(
                session.ram_mut(),
                rq,
                opts.rx_buffers,
                buffer,
                mrg,
                opts.timeout,
            )?);
            let tq = take(&mut session, p * 2 + 1)?;
            tx.push(NetTxQueue::new(
                session.ram_mut(),
                tq,
                opts.tx_slots,
                opts.timeout,
            )?);
        }
        let ctrl = match ctrl_index {
            Some(i) => {
                let cq = take(&mut session, i)?;
                Some(NetCtrlQueue::new(session.ram_mut(), cq, opts.timeout)?)
            }
            None => None,
        };
        let mut driver = NetDriver {
            session,
            config,
            rx,
            tx,
            ctrl,
            opts: NetOptions { pairs, ..opts },
        };
        if opts.set_pairs && has(VIRTIO_NET_F_MQ) && pairs > 1 {
            let ack = driver.ctrl()?.set_queue_pairs(pairs)?;
            if ack != CtrlAck::Ok {
                return Err(NetError::Device {
                    queue: device_pairs * 2,
                    reason: format!("VQ_PAIRS_SET({pairs}) answered {ack:?}"),
                });
            }
        }
        Ok(driver)
    }

    /// The config read at setup (or by the last [`NetDriver::refresh_config`]).
    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// Re-reads the config space (after a config-change notification).
    pub fn refresh_config(&mut self) -> Result<&NetConfig, NetError> {
        self.config = read_config(&mut self.session)?;
        Ok(&self.config)
    }

    /// The options in force (`pairs` is the number of pairs set up).
    pub fn options(&self) -> &NetOptions {
        &self.opts
    }

    /// Whether virtio feature `bit` was negotiated.
    pub fn has_feature(&self, bit: u32) -> bool {
        self.session.negotiated().has_feature(bit)
    }

    /// The receive queue of pair `pair`.
    pub fn rx(&mut self, pair: u16) -> Result<&mut NetRxQueue, NetError> {
        self.rx
            .get_mut(usize::from(pair))
            .ok_or(NetError::NoPair(pair))
    }

    /// The transmit queue of pair `pair`.
    pub fn tx(&mut self, pair: u16) -> Result<&mut NetTxQueue, NetError> {
        self.tx
            .get_mut(usize::from(pair))
            .ok_or(NetError::NoPair(pair))
    }

    /// The control queue.
    pub fn ctrl(&mut self) -> Result<&mut NetCtrlQueue, NetError> {
        self.ctrl.as_mut().ok_or(NetError::NoCtrl)
    }

    /// Sends `frame` (an Ethernet frame) on pair `pair` behind a header with no offload, and
    /// waits until the device has taken it.
    pub fn send(&mut self, pair: u16, frame: &[u8]) -> Result<(), NetError> {
        let tx = self.tx(pair)?;
        tx.send(NetHdr::default(), frame)?;
        tx.flush()
    }

    /// Waits up to `timeout` for the next packet on pair `pair`.
    pub fn recv(&mut self, pair: u16, timeout: Duration) -> Result<Option<RxPacket>, NetError> {
        self.rx(pair)?.recv(timeout)
    }

    /// The session, for control messages.
    pub fn session(&mut self) -> &mut Session {
        &mut self.session
    }

    /// Stops every queue (GET_VRING_BASE) and closes the connection; returns the bases.
    pub fn disconnect(self) -> Result<Vec<Option<u32>>, NetError> {
        Ok(self.session.disconnect()?)
    }
}

fn read_config(session: &mut Session) -> Result<NetConfig, NetError> {
    if !session
        .negotiated()
        .has_protocol(VhostUserProtocolFeatures::CONFIG)
    {
        return Err(NetError::NoConfig);
    }
    let raw = session.get_config(0, NetConfig::LEN)?;
    NetConfig::parse(&raw)
}
