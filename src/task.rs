//! Task ownership: every spawned task belongs to a [`Scope`], and dropping
//! or stopping the scope ends all of its tasks at their next await point.
//! A station's scope owns its connections; a session's scope owns its
//! streams; nothing outlives its owner.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use event_listener::Event;
use futures_lite::future;

/// Races `work` against `limit`: past it, the error `timed_out` makes.
/// Every deadline in the program is this race; the callers name the error.
pub async fn within<T, E>(
    limit: std::time::Duration,
    timed_out: impl FnOnce() -> E,
    work: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    future::or(work, async {
        async_io::Timer::after(limit).await;
        Err(timed_out())
    })
    .await
}

/// The executor every task of the program runs on.
static EXECUTOR: smol::Executor<'static> = smol::Executor::new();

/// Runs `work` on the program's executor, started on first use: what
/// `smol::spawn` does (`SMOL_THREADS` threads, one by default, named
/// `smol-N`), without the child-process reaper smol's global executor
/// starts beside it, since postern starts no processes: about 4 KiB of the
/// armv7 agent (docs/BENCHMARKS.md, "Device builds").
pub fn spawn<T: Send + 'static>(work: impl Future<Output = T> + Send + 'static) -> smol::Task<T> {
    start_executor();
    EXECUTOR.spawn(work)
}

/// Starts the executor's threads, once. Not generic, unlike [`spawn`]: one
/// copy in the binary, not one per kind of task.
fn start_executor() {
    static THREADS: std::sync::Once = std::sync::Once::new();
    THREADS.call_once(|| {
        let threads =
            std::env::var("SMOL_THREADS").ok().and_then(|text| text.parse().ok()).unwrap_or(1);
        for n in 1..=threads {
            std::thread::Builder::new()
                .name(format!("smol-{n}"))
                .spawn(|| loop {
                    // As smol: a task that panics does not stop the others.
                    let run = || async_io::block_on(EXECUTOR.run(future::pending::<()>()));
                    let _ = std::panic::catch_unwind(run);
                })
                .expect("the executor thread starts: nothing runs without it");
        }
    });
}

#[derive(Default)]
struct Signal {
    stopped: AtomicBool,
    event: Event,
}

/// Owns a group of tasks; they stop when it is stopped or dropped.
#[derive(Default)]
pub struct Scope {
    signal: Arc<Signal>,
}

impl Scope {
    pub fn new() -> Self {
        Scope::default()
    }

    /// Runs `work` on the executor until it finishes or the scope stops.
    pub fn spawn(&self, work: impl Future<Output = ()> + Send + 'static) {
        self.spawn_boxed(Box::pin(work));
    }

    /// [`Scope::spawn`] for every kind of task at once: one copy of the
    /// executor's task code and of the race with `stopped`, not one per
    /// kind (docs/BENCHMARKS.md, "Device builds"), for one allocation more
    /// per task.
    fn spawn_boxed(&self, work: Pin<Box<dyn Future<Output = ()> + Send + 'static>>) {
        let stopped = Self::stopped_signal(self.signal.clone());
        spawn(future::or(work, stopped)).detach();
    }

    /// A future that resolves once the scope stops.
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        Self::stopped_signal(self.signal.clone())
    }

    async fn stopped_signal(signal: Arc<Signal>) {
        loop {
            let listener = signal.event.listen();
            if signal.stopped.load(Ordering::Acquire) {
                return;
            }
            listener.await;
        }
    }

    /// Ends every task of this scope.
    pub fn stop(&self) {
        self.signal.stopped.store(true, Ordering::Release);
        self.signal.event.notify(usize::MAX);
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn dropping_the_scope_ends_its_tasks() {
        smol::block_on(async {
            let scope = Scope::new();
            let (tx, rx) = smol::channel::bounded::<()>(1);
            scope.spawn(async move {
                let _keep = tx;
                smol::Timer::after(Duration::from_secs(3600)).await;
            });
            drop(scope);
            // The task dropped its sender: the channel closes promptly.
            let closed = future::or(async { rx.recv().await.is_err() }, async {
                smol::Timer::after(Duration::from_secs(5)).await;
                false
            });
            assert!(closed.await);
        });
    }
}
