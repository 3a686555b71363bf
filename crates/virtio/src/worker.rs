//! Owned worker threads that run a device's queues.
//!
//! A [`QueueWorker`] is a thread that owns some of a device's [`ActiveQueue`]s and a
//! [`QueueHandler`] (the device-specific request logic). It waits on the queues' kick eventfds and
//! on the handler's completion fd, takes one guest-memory snapshot per batch of events, and hands
//! the work to the handler. [`QueueWorker::stop`] asks the handler to finish every request in
//! flight and returns the queues; dropping a worker does the same and drops them.
//!
//! With a poll interval the worker busy-polls its queues for that long after the last work it
//! found before it sleeps again, trading a CPU for latency.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{ActiveQueue, GuestMemoryHandle, GuestMemoryMmap, Interrupt};
use vm_memory::GuestAddressSpace;

/// A function every worker thread runs first, before it touches a queue: the program installs
/// its sandbox for the worker role here, so that every device's workers are confined without the
/// device knowing. It returns an error to refuse to run (the worker then reports
/// DEVICE_NEEDS_RESET and serves nothing).
pub type ThreadStartHook = fn() -> Result<(), String>;

static THREAD_START_HOOK: std::sync::OnceLock<ThreadStartHook> = std::sync::OnceLock::new();

/// Sets the hook every worker thread runs at start. It can be set once per process; a second
/// call returns false and changes nothing.
pub fn set_thread_start_hook(hook: ThreadStartHook) -> bool {
    THREAD_START_HOOK.set(hook).is_ok()
}

/// The device-specific half of a worker.
///
/// Guest memory is passed as the snapshot of the current batch. A handler that leaves requests in
/// flight across calls (asynchronous I/O into guest buffers) keeps a clone of the `Arc` with each
/// request, so the mapping outlives a memory-table change until the request completes.
pub trait QueueHandler: Send + 'static {
    /// Queue `queue` may have buffers (after a kick, and once when the worker starts): take and
    /// process them. An error means the queue is unusable (a corrupt ring); the worker stops
    /// serving that queue and reports DEVICE_NEEDS_RESET.
    fn process_queue(
        &mut self,
        queue: &mut ActiveQueue,
        mem: &Arc<GuestMemoryMmap>,
        interrupt: &dyn Interrupt,
    ) -> Result<(), virtio_queue::Error>;

    /// A file descriptor that becomes readable when requests the handler submitted complete
    /// (an io_uring's eventfd), if the handler completes requests asynchronously.
    fn completion_fd(&self) -> Option<RawFd>;

    /// Publishes completed requests. Must not block. Returns whether it completed anything.
    fn process_completions(
        &mut self,
        queues: &mut [ActiveQueue],
        mem: &Arc<GuestMemoryMmap>,
        interrupt: &dyn Interrupt,
    ) -> bool;

    /// Waits for and publishes every request still in flight. Called before the queues are
    /// handed back, so that none is left half done.
    fn drain(
        &mut self,
        queues: &mut [ActiveQueue],
        mem: &Arc<GuestMemoryMmap>,
        interrupt: &dyn Interrupt,
    );
}

/// What every worker of a device shares.
#[derive(Clone, Debug)]
pub struct WorkerContext {
    /// Guest memory.
    pub memory: GuestMemoryHandle,
    /// The interrupt sink.
    pub interrupt: Arc<dyn Interrupt>,
    /// Busy-poll for this long after the last work found before sleeping (zero: never poll).
    pub poll: Duration,
}

/// Typed epoll tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token {
    Stop,
    Completion,
    Kick(usize),
}

impl Token {
    fn encode(self) -> u64 {
        match self {
            Token::Stop => 0,
            Token::Completion => 1,
            Token::Kick(i) => 2 + i as u64,
        }
    }

    fn decode(v: u64) -> Token {
        match v {
            0 => Token::Stop,
            1 => Token::Completion,
            n => Token::Kick((n - 2) as usize),
        }
    }
}

/// A thread running some of a device's queues.
#[derive(Debug)]
pub struct QueueWorker {
    stop: EventFd,
    thread: Option<JoinHandle<Vec<ActiveQueue>>>,
}

impl QueueWorker {
    /// Starts a thread named `name` that serves `queues` with `handler`.
    pub fn spawn<H: QueueHandler>(
        name: String,
        queues: Vec<ActiveQueue>,
        handler: H,
        ctx: WorkerContext,
    ) -> std::io::Result<Self> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let stop_rx = stop.try_clone()?;
        let epoll = Epoll::new()?;
        let add = |fd: RawFd, token: Token| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token.encode()),
            )
        };
        add(stop_rx.as_raw_fd(), Token::Stop)?;
        if let Some(fd) = handler.completion_fd() {
            add(fd, Token::Completion)?;
        }
        for (i, q) in queues.iter().enumerate() {
            add(q.kick().as_raw_fd(), Token::Kick(i))?;
        }
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            let mut w = WorkerLoop {
                epoll,
                _stop: stop_rx,
                queues,
                broken: Vec::new(),
                handler,
                ctx,
            };
            w.run();
            w.finish()
        })?;
        Ok(QueueWorker {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread after it has completed every request in flight, and returns its queues.
    pub fn stop(mut self) -> Vec<ActiveQueue> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Vec<ActiveQueue> {
        let Some(thread) = self.thread.take() else {
            return Vec::new();
        };
        if let Err(e) = self.stop.write(1) {
            log::error!("cannot signal a queue worker to stop: {e}");
        }
        match thread.join() {
            Ok(queues) => queues,
            Err(_) => {
                log::error!("a queue worker panicked; its queues are lost");
                Vec::new()
            }
        }
    }
}

impl Drop for QueueWorker {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

struct WorkerLoop<H> {
    epoll: Epoll,
    _stop: EventFd,
    queues: Vec<ActiveQueue>,
    broken: Vec<bool>,
    handler: H,
    ctx: WorkerContext,
}

impl<H: QueueHandler> WorkerLoop<H> {
    fn run(&mut self) {
        self.broken = vec![false; self.queues.len()];
        // A frontend need not kick a queue it starts with buffers in it: look once.
        let mem = self.ctx.memory.memory().into_inner();
        for i in 0..self.queues.len() {
            self.process(i, &mem);
        }
        drop(mem);
        let mut events = vec![EpollEvent::default(); self.queues.len() + 2];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("queue worker: epoll_wait failed: {e}");
                    self.ctx.interrupt.signal_needs_reset();
                    return;
                }
            };
            let mem = self.ctx.memory.memory().into_inner();
            for ev in &events[..n] {
                match Token::decode(ev.data()) {
                    Token::Stop => return,
                    Token::Completion => {
                        self.handler.process_completions(
                            &mut self.queues,
                            &mem,
                            self.ctx.interrupt.as_ref(),
                        );
                    }
                    Token::Kick(i) => {
                        // Reading resets the counter; a failure only means no kick was pending.
                        let _ = self.queues[i].kick().read();
                        self.process(i, &mem);
                    }
                }
            }
            if !self.ctx.poll.is_zero() {
                self.poll(&mem);
            }
        }
    }

    /// Busy-polls every queue and the completions until nothing turns up for `ctx.poll`.
    fn poll(&mut self, mem: &Arc<GuestMemoryMmap>) {
        let mut idle_since = Instant::now();
        while idle_since.elapsed() < self.ctx.poll {
            let mut found = self.handler.process_completions(
                &mut self.queues,
                mem,
                self.ctx.interrupt.as_ref(),
            );
            for i in 0..self.queues.len() {
                if !self.broken[i] && self.queues[i].has_available(mem).unwrap_or(false) {
                    self.process(i, mem);
                    found = true;
                }
            }
            if found {
                idle_since = Instant::now();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    fn process(&mut self, i: usize, mem: &Arc<GuestMemoryMmap>) {
        if self.broken[i] {
            return;
        }
        let q = &mut self.queues[i];
        if let Err(e) = self
            .handler
            .process_queue(q, mem, self.ctx.interrupt.as_ref())
        {
            log::error!("queue {}: {e}; the queue is stopped until reset", q.index());
            self.broken[i] = true;
            self.ctx.interrupt.signal_needs_reset();
        }
    }

    fn finish(mut self) -> Vec<ActiveQueue> {
        let mem = self.ctx.memory.memory().into_inner();
        self.handler
            .drain(&mut self.queues, &mem, self.ctx.interrupt.as_ref());
        self.queues
    }
}
