//! The vhost-user interrupt sink: call eventfds per queue and the backend channel.

use std::os::unix::net::UnixStream;
use std::sync::{Mutex, RwLock};

use outboard_virtio::Interrupt;
use vhost::vhost_user::message::BackendReq;
use vmm_sys_util::eventfd::EventFd;

use crate::wire;

/// Call eventfds, error eventfds and the backend channel of one session. The control thread
/// replaces them as the frontend sends new ones; queue workers signal through them.
#[derive(Debug)]
pub struct VhostUserInterrupt {
    calls: RwLock<Vec<Option<EventFd>>>,
    errs: RwLock<Vec<Option<EventFd>>>,
    channel: Mutex<Option<UnixStream>>,
}

impl VhostUserInterrupt {
    /// A sink for `queues` queues with nothing connected.
    pub fn new(queues: usize) -> Self {
        VhostUserInterrupt {
            calls: RwLock::new((0..queues).map(|_| None).collect()),
            errs: RwLock::new((0..queues).map(|_| None).collect()),
            channel: Mutex::new(None),
        }
    }

    /// Sets (or clears) the call eventfd of queue `index`.
    pub fn set_call(&self, index: usize, fd: Option<EventFd>) {
        if let Some(slot) = write(&self.calls).get_mut(index) {
            *slot = fd;
        }
    }

    /// Sets (or clears) the error eventfd of queue `index`.
    pub fn set_err(&self, index: usize, fd: Option<EventFd>) {
        if let Some(slot) = write(&self.errs).get_mut(index) {
            *slot = fd;
        }
    }

    /// Sets the backend channel (SET_BACKEND_REQ_FD). The channel is made non-blocking: workers
    /// send on it, and a frontend that does not read it must not stop a worker, or the control
    /// thread would wait forever to quiesce the device. A message that finds it full is dropped.
    pub fn set_channel(&self, sock: Option<UnixStream>) {
        if let Some(Err(e)) = sock.as_ref().map(|s| s.set_nonblocking(true)) {
            log::warn!("cannot make the backend channel non-blocking: {e}");
        }
        *self.channel.lock().unwrap_or_else(|p| p.into_inner()) = sock;
    }

    /// Duplicates of queue `index`'s call and error eventfds (live upgrade hands them on).
    pub(crate) fn dup_queue_fds(
        &self,
        index: usize,
    ) -> std::io::Result<(Option<EventFd>, Option<EventFd>)> {
        let dup = |fds: &RwLock<Vec<Option<EventFd>>>| {
            let fds = fds.read().unwrap_or_else(|p| p.into_inner());
            fds.get(index)
                .and_then(Option::as_ref)
                .map(EventFd::try_clone)
                .transpose()
        };
        Ok((dup(&self.calls)?, dup(&self.errs)?))
    }

    /// A duplicate of the backend channel, if one is set (live upgrade hands it on).
    pub(crate) fn dup_channel(&self) -> std::io::Result<Option<UnixStream>> {
        let channel = self.channel.lock().unwrap_or_else(|p| p.into_inner());
        channel.as_ref().map(UnixStream::try_clone).transpose()
    }

    /// Drops everything the frontend gave (at disconnect).
    pub fn clear(&self) {
        write(&self.calls).iter_mut().for_each(|s| *s = None);
        write(&self.errs).iter_mut().for_each(|s| *s = None);
        self.set_channel(None);
    }

    fn send_config_change(&self) {
        let guard = self.channel.lock().unwrap_or_else(|p| p.into_inner());
        let Some(sock) = guard.as_ref() else {
            log::debug!("config change with no backend channel: the frontend is not told");
            return;
        };
        // No NEED_REPLY: a worker must never wait on the frontend, which may itself be waiting
        // for a reply from the control thread that is stopping this worker.
        if let Err(e) = wire::send_message(
            sock,
            BackendReq::CONFIG_CHANGE_MSG.into(),
            false,
            false,
            &[],
            &[],
        ) {
            log::warn!("cannot send a config-change message: {e}");
        }
    }
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

impl Interrupt for VhostUserInterrupt {
    fn signal_queue(&self, index: u16) {
        let calls = self.calls.read().unwrap_or_else(|p| p.into_inner());
        if let Some(Some(fd)) = calls.get(index as usize) {
            if let Err(e) = fd.write(1) {
                log::warn!("queue {index}: cannot signal the call eventfd: {e}");
            }
        }
    }

    fn signal_config(&self) {
        self.send_config_change();
    }

    fn signal_needs_reset(&self) {
        for fd in self
            .errs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .flatten()
        {
            let _ = fd.write(1);
        }
        self.send_config_change();
    }
}
