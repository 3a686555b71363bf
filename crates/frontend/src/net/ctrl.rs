//! The control queue: commands (class, command, data) and the device's one-byte ack.

use std::time::Duration;

use virtio_bindings::virtio_net::*;

use crate::queue::{DriverQueue, Segment, Used};
use crate::ram::{GuestBuf, GuestRam};

use super::NetError;

/// The largest command data this queue sends.
pub const MAX_COMMAND_DATA: usize = 16 * 1024;
/// The ack's value before the device writes it.
const ACK_UNWRITTEN: u8 = 0xff;

/// The device's answer to a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtrlAck {
    /// `VIRTIO_NET_OK`.
    Ok,
    /// `VIRTIO_NET_ERR`.
    Err,
    /// Anything else (0xff: the device did not write the ack).
    Other(u8),
}

impl From<u8> for CtrlAck {
    fn from(b: u8) -> Self {
        match u32::from(b) {
            VIRTIO_NET_OK => CtrlAck::Ok,
            VIRTIO_NET_ERR => CtrlAck::Err,
            _ => CtrlAck::Other(b),
        }
    }
}

/// The receive modes of `VIRTIO_NET_CTRL_RX`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxMode {
    /// Every frame.
    Promisc,
    /// Every multicast frame.
    AllMulti,
    /// Every unicast frame.
    AllUni,
    /// No multicast frame.
    NoMulti,
    /// No unicast frame.
    NoUni,
    /// No broadcast frame.
    NoBcast,
}

impl RxMode {
    /// The command code.
    pub fn code(self) -> u8 {
        (match self {
            RxMode::Promisc => VIRTIO_NET_CTRL_RX_PROMISC,
            RxMode::AllMulti => VIRTIO_NET_CTRL_RX_ALLMULTI,
            RxMode::AllUni => VIRTIO_NET_CTRL_RX_ALLUNI,
            RxMode::NoMulti => VIRTIO_NET_CTRL_RX_NOMULTI,
            RxMode::NoUni => VIRTIO_NET_CTRL_RX_NOUNI,
            RxMode::NoBcast => VIRTIO_NET_CTRL_RX_NOBCAST,
        }) as u8
    }
}

/// The control queue, with one command buffer (the driver waits for each ack, as Linux does).
#[derive(Debug)]
pub struct NetCtrlQueue {
    dq: DriverQueue,
    cmd: GuestBuf,
    ack: GuestBuf,
    timeout: Duration,
    used: Vec<Used>,
}

impl NetCtrlQueue {
    pub(crate) fn new(
        ram: &mut GuestRam,
        dq: DriverQueue,
        timeout: Duration,
    ) -> Result<Self, NetError> {
        Ok(NetCtrlQueue {
            cmd: ram.alloc(2 + MAX_COMMAND_DATA, 64)?,
            ack: ram.alloc(1, 64)?,
            dq,
            timeout,
            used: Vec::new(),
        })
    }

    /// The queue's index on the device.
    pub fn index(&self) -> u16 {
        self.dq.index()
    }

    /// Submits the chain `segments` and waits for its used entry (for malformed commands).
    pub fn raw(&mut self, segments: &[Segment]) -> Result<Used, NetError> {
        let head = self.dq.submit(segments)?;
        self.used.clear();
        while self.used.is_empty() {
            self.dq.wait_used(self.timeout, &mut self.used)?;
        }
        let u = self.used[0];
        if u.id != u32::from(head) || self.used.len() > 1 {
            return Err(NetError::Device {
                queue: self.dq.index(),
                reason: format!("used {:?} for the one command {head} in flight", self.used),
            });
        }
        Ok(u)
    }

    /// Sends a command laid out as Linux does (header, data, ack in three descriptors) and
    /// returns the ack.
    pub fn command(&mut self, class: u8, command: u8, data: &[u8]) -> Result<CtrlAck, NetError> {
        if data.len() > MAX_COMMAND_DATA {
            return Err(NetError::TooLarge {
                len: data.len(),
                max: MAX_COMMAND_DATA,
            });
        }
        self.cmd.write_at(0, &[class, command]);
        self.cmd.write_at(2, data);
        self.ack.write_at(0, &[ACK_UNWRITTEN]);
        let mut segments = vec![Segment::readable_part(&self.cmd, 0, 2)];
        if !data.is_empty() {
            segments.push(Segment::readable_part(&self.cmd, 2, data.len()));
        }
        segments.push(Segment::writable(&self.ack));
        let used = self.raw(&segments)?;
        if used.len != 1 {
            return Err(NetError::Device {
                queue: self.dq.index(),
                reason: format!("a used length of {} for a command (expected 1)", used.len),
            });
        }
        Ok(CtrlAck::from(self.ack.read_u8(0)))
    }

    /// `VIRTIO_NET_CTRL_RX`: turns a receive mode on or off.
    pub fn set_rx_mode(&mut self, mode: RxMode, on: bool) -> Result<CtrlAck, NetError> {
        self.command(VIRTIO_NET_CTRL_RX as u8, mode.code(), &[u8::from(on)])
    }

    /// `VIRTIO_NET_CTRL_MAC_TABLE_SET`: the unicast and multicast filter tables.
    pub fn set_mac_table(
        &mut self,
        unicast: &[[u8; 6]],
        multicast: &[[u8; 6]],
    ) -> Result<CtrlAck, NetError> {
        let mut data = Vec::with_capacity(8 + 6 * (unicast.len() + multicast.len()));
        for list in [unicast, multicast] {
            data.extend((list.len() as u32).to_le_bytes());
            for mac in list {
                data.extend(mac);
            }
        }
        self.command(
            VIRTIO_NET_CTRL_MAC as u8,
            VIRTIO_NET_CTRL_MAC_TABLE_SET as u8,
            &data,
        )
    }

    /// `VIRTIO_NET_CTRL_MAC_ADDR_SET`: the default MAC address.
    pub fn set_mac(&mut self, mac: [u8; 6]) -> Result<CtrlAck, NetError> {
        self.command(
            VIRTIO_NET_CTRL_MAC as u8,
            VIRTIO_NET_CTRL_MAC_ADDR_SET as u8,
            &mac,
        )
    }

    /// `VIRTIO_NET_CTRL_VLAN_ADD` or `_DEL`.
    pub fn vlan(&mut self, vid: u16, add: bool) -> Result<CtrlAck, NetError> {
        let command = if add {
            VIRTIO_NET_CTRL_VLAN_ADD
        } else {
            VIRTIO_NET_CTRL_VLAN_DEL
        };
        self.command(
            VIRTIO_NET_CTRL_VLAN as u8,
            command as u8,
            &vid.to_le_bytes(),
        )
    }

    /// `VIRTIO_NET_CTRL_ANNOUNCE_ACK`.
    pub fn announce_ack(&mut self) -> Result<CtrlAck, NetError> {
        self.command(
            VIRTIO_NET_CTRL_ANNOUNCE as u8,
            VIRTIO_NET_CTRL_ANNOUNCE_ACK as u8,
            &[],
        )
    }

    /// `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`.
    pub fn set_queue_pairs(&mut self, pairs: u16) -> Result<CtrlAck, NetError> {
        self.command(
            VIRTIO_NET_CTRL_MQ as u8,
            VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8,
            &pairs.to_le_bytes(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_and_modes_map_to_the_spec_codes() {
        assert_eq!(CtrlAck::from(0), CtrlAck::Ok);
        assert_eq!(CtrlAck::from(1), CtrlAck::Err);
        assert_eq!(CtrlAck::from(0xff), CtrlAck::Other(0xff));
        assert_eq!(RxMode::Promisc.code(), 0);
        assert_eq!(RxMode::NoBcast.code(), 5);
    }
}
