//! The control queue's worker: takes each command chain, parses it, applies it to the shared
//! device state and writes the ack.

use std::os::fd::RawFd;
use std::sync::Arc;

use outboard_virtio::worker::QueueHandler;
use outboard_virtio::{ActiveQueue, Chain, GuestMemoryMmap, Interrupt};
use virtio_bindings::virtio_net::{VIRTIO_NET_ERR, VIRTIO_NET_OK};
use vm_memory::Bytes;

use super::{CtrlCommand, CtrlError, RxModeKind, MAX_COMMAND_LEN};
use crate::chain::{read_all, ChainBuffers};
use crate::config::{Negotiated, STATUS_ANNOUNCE};
use crate::filter::MacTable;
use crate::shared::Shared;
use crate::stats::inc;

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct CtrlHandler {
    shared: Arc<Shared>,
    negotiated: Negotiated,
    max_pairs: u16,
    bytes: Vec<u8>,
}

impl CtrlHandler {
    pub fn new(shared: Arc<Shared>, negotiated: Negotiated, max_pairs: u16) -> Self {
        CtrlHandler {
            shared,
            negotiated,
            max_pairs,
            bytes: Vec::new(),
        }
    }

    /// Reads, parses and applies one command; returns the used length (1 with an ack, 0 for a
    /// chain with no room for one).
    fn handle(&mut self, chain: Chain<'_>, mem: &GuestMemoryMmap) -> u32 {
        let buffers = match ChainBuffers::walk(chain, mem) {
            Ok(b) => b,
            Err(e) => {
                log::warn!("virtio-net: control chain refused: {e}");
                inc(&self.shared.stats.ctrl_unanswerable);
                return 0;
            }
        };
        let Some(ack) = buffers.writable.iter().find(|b| b.len > 0) else {
            log::warn!("virtio-net: control command without room for the ack");
            inc(&self.shared.stats.ctrl_unanswerable);
            return 0;
        };
        let status = match self.command(&buffers, mem) {
            Ok(()) => {
                inc(&self.shared.stats.ctrl_ok);
                VIRTIO_NET_OK
            }
            Err(e) => {
                log::debug!("virtio-net: control command refused: {e}");
                inc(&self.shared.stats.ctrl_err);
                VIRTIO_NET_ERR
            }
        };
        match mem.write_obj(status as u8, ack.addr) {
            Ok(()) => 1,
            Err(e) => {
                log::warn!("virtio-net: cannot write the control ack: {e}");
                0
            }
        }
    }

    fn command(&mut self, buffers: &ChainBuffers, mem: &GuestMemoryMmap) -> Result<(), CtrlError> {
        let len = buffers.readable_len();
        if len > MAX_COMMAND_LEN as u64 {
            return Err(CtrlError::TooLong { len });
        }
        if let Err(e) = read_all(mem, &buffers.readable, &mut self.bytes) {
            // The buffers were checked against this memory snapshot: this does not happen.
            log::warn!("virtio-net: cannot read a control command: {e}");
            return Err(CtrlError::Unreadable { len });
        }
        let command = CtrlCommand::parse(&self.bytes, &self.negotiated, self.max_pairs)?;
        log::debug!("virtio-net: control command {command:?}");
        self.apply(command);
        Ok(())
    }

    fn apply(&self, command: CtrlCommand) {
        match command {
            CtrlCommand::RxMode { kind, on } => {
                let mut rx = self.shared.rx_mut();
                let mode = &mut rx.filter.mode;
                let field = match kind {
                    RxModeKind::Promisc => &mut mode.promisc,
                    RxModeKind::AllMulti => &mut mode.allmulti,
                    RxModeKind::AllUni => &mut mode.alluni,
                    RxModeKind::NoMulti => &mut mode.nomulti,
                    RxModeKind::NoUni => &mut mode.nouni,
                    RxModeKind::NoBcast => &mut mode.nobcast,
                };
                *field = on;
            }
            CtrlCommand::MacTableSet { unicast, multicast } => {
                let table = MacTable::from_lists(unicast, multicast);
                self.shared.rx_mut().filter.table = table;
            }
            CtrlCommand::MacAddrSet(mac) => self.shared.rx_mut().filter.mac = mac,
            CtrlCommand::VlanAdd(vid) => self.shared.rx_mut().filter.vlans.set(vid, true),
            CtrlCommand::VlanDel(vid) => self.shared.rx_mut().filter.vlans.set(vid, false),
            CtrlCommand::AnnounceAck => self.shared.update_status(0, STATUS_ANNOUNCE),
            CtrlCommand::VqPairsSet(pairs) => {
                self.shared.rx_mut().pairs = pairs;
                log::info!("virtio-net: the driver uses {pairs} queue pair(s)");
                self.shared.wake_workers();
            }
        }
    }
}

impl QueueHandler for CtrlHandler {
    fn process_queue(
        &mut self,
        queue: &mut ActiveQueue,
        mem: &Arc<GuestMemoryMmap>,
        interrupt: &dyn Interrupt,
    ) -> Result<(), virtio_queue::Error> {
        let mut result = Ok(());
        let taken = queue.take_available(mem, |q, chain| {
            let head = chain.head_index();
            let len = self.handle(chain, mem);
            if let Err(e) = q.add_used(mem, head, len) {
                result = Err(e);
            }
        })?;
        result?;
        if taken > 0 {
            queue.notify(mem, interrupt);
        }
        Ok(())
    }

    fn completion_fd(&self) -> Option<RawFd> {
        None
    }

    fn process_completions(
        &mut self,
        _queues: &mut [ActiveQueue],
        _mem: &Arc<GuestMemoryMmap>,
        _interrupt: &dyn Interrupt,
    ) -> bool {
        false
    }

    fn drain(
        &mut self,
        _queues: &mut [ActiveQueue],
        _mem: &Arc<GuestMemoryMmap>,
        _interrupt: &dyn Interrupt,
    ) {
        // Commands complete before `process_queue` returns: nothing is ever in flight.
    }
}
