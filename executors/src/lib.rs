//! TEMPORARY stub so the file service compiles before the real executors crate lands.
#![allow(missing_docs)]
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;

use glommio::io::DmaBuffer;

#[derive(Clone, Copy, Debug)]
pub enum HugepageMode {
    Auto,
    Require,
    Off,
}

pub struct ShardConfig {
    pub shards: usize,
    pub io_memory_per_shard: usize,
    pub hugepages: HugepageMode,
}

pub struct ArenaAllocator;
// SAFETY: forwards to System.
unsafe impl std::alloc::GlobalAlloc for ArenaAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: forwarded.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: forwarded.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

pub struct ShardSender<M>(flume::Sender<M>);
impl<M> Clone for ShardSender<M> {
    fn clone(&self) -> Self {
        ShardSender(self.0.clone())
    }
}
impl<M> ShardSender<M> {
    pub fn send(&self, m: M) -> Result<(), M> {
        self.0.send(m).map_err(|e| e.0)
    }
}

pub struct Mailbox<M>(flume::Receiver<M>);
impl<M> Mailbox<M> {
    pub async fn recv(&self) -> Option<M> {
        self.0.recv_async().await.ok()
    }
}

pub struct ShardContext<M> {
    pub id: usize,
    pub pool: Rc<BufferPool>,
    pub peers: Vec<ShardSender<M>>,
}

pub struct BufferPool {
    capacity: usize,
}
pub struct Reservation;
pub struct PoolBuffer(DmaBuffer);
impl std::ops::Deref for PoolBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}
impl std::ops::DerefMut for PoolBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.0.as_bytes_mut()
    }
}
impl BufferPool {
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    pub async fn reserve(&self, _len: usize) -> Reservation {
        Reservation
    }
    pub async fn alloc(&self, len: usize) -> PoolBuffer {
        PoolBuffer(glommio::allocate_dma_buffer(len))
    }
}

pub struct Shards<M> {
    senders: Vec<ShardSender<M>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl<M: Send + 'static> Shards<M> {
    pub fn start<F, Fut>(config: &ShardConfig, body: F) -> Result<Shards<M>, String>
    where
        F: Fn(ShardContext<M>, Mailbox<M>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let body = Arc::new(body);
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..config.shards)
            .map(|_| {
                let (s, r) = flume::unbounded();
                (ShardSender(s), r)
            })
            .unzip();
        let mut threads = Vec::new();
        for (id, r) in receivers.into_iter().enumerate() {
            let body = body.clone();
            let peers = senders.clone();
            let mem = config.io_memory_per_shard;
            threads.push(std::thread::spawn(move || {
                let ex = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
                    .io_memory(mem)
                    .make()
                    .unwrap();
                ex.run(async move {
                    let ctx = ShardContext {
                        id,
                        pool: Rc::new(BufferPool { capacity: mem }),
                        peers,
                    };
                    body(ctx, Mailbox(r)).await
                });
            }));
        }
        Ok(Shards { senders, threads })
    }
    pub fn sender(&self, i: usize) -> &ShardSender<M> {
        &self.senders[i]
    }
    pub fn shutdown(self) -> Result<(), String> {
        drop(self.senders);
        for t in self.threads {
            t.join().map_err(|_| "panic".to_string())?;
        }
        Ok(())
    }
}
