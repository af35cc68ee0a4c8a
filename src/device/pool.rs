//! A cache of device buffers keyed by byte size, so a loop of ops with the same shapes
//! allocates once. A buffer goes back to its pool when the last tensor using it drops.
//!
//! Work on a device is queued in order on one stream (CUDA) or one queue (wgpu), so a
//! buffer handed out again is only written after every queued read of its old contents.

use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::sync::{Arc, Mutex};

/// Round sizes up to this many bytes so nearby sizes share a bucket.
const GRANULE: usize = 256;

pub(crate) struct Pool<B> {
    inner: Mutex<PoolInner<B>>,
    /// The most bytes kept idle; past it, returned buffers are freed.
    max_idle_bytes: usize,
}

struct PoolInner<B> {
    free: HashMap<usize, Vec<B>>,
    idle_bytes: usize,
    /// Bytes of the buffers on loan (bucket sizes), and the most since the last reset.
    live_bytes: usize,
    peak_bytes: usize,
}

impl<B> Pool<B> {
    pub(crate) fn new(max_idle_bytes: usize) -> Arc<Self> {
        Arc::new(Pool {
            inner: Mutex::new(PoolInner { free: HashMap::new(), idle_bytes: 0, live_bytes: 0, peak_bytes: 0 }),
            max_idle_bytes,
        })
    }

    /// The size a request of `bytes` is rounded to (never 0: backends refuse empty buffers).
    pub(crate) fn bucket(bytes: usize) -> usize {
        bytes.max(1).div_ceil(GRANULE) * GRANULE
    }

    /// Takes an idle buffer of the bucket's size, if one is there.
    pub(crate) fn take(&self, bucket: usize) -> Option<B> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let buf = inner.free.get_mut(&bucket)?.pop()?;
        inner.idle_bytes -= bucket;
        Some(buf)
    }

    fn put(&self, bucket: usize, buf: B) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.live_bytes = inner.live_bytes.saturating_sub(bucket);
        if inner.idle_bytes + bucket <= self.max_idle_bytes {
            inner.idle_bytes += bucket;
            inner.free.entry(bucket).or_default().push(buf);
        }
    }

    /// Counts a buffer of `bucket` bytes as on loan.
    fn lend(&self, bucket: usize) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.live_bytes += bucket;
        inner.peak_bytes = inner.peak_bytes.max(inner.live_bytes);
    }

    /// `(live, peak)`: bytes on loan now, and the most on loan at once since the last
    /// [`Pool::reset_peak`] (idle buffers are not counted).
    pub(crate) fn usage(&self) -> (usize, usize) {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        (inner.live_bytes, inner.peak_bytes)
    }

    /// Starts a new peak from the bytes on loan now.
    pub(crate) fn reset_peak(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.peak_bytes = inner.live_bytes;
    }

    /// Frees every idle buffer (after an allocation failed, before retrying it).
    pub(crate) fn clear(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.free.clear();
        inner.idle_bytes = 0;
    }
}

/// A buffer on loan from a pool; it goes back when dropped.
pub(crate) struct Pooled<B> {
    buf: ManuallyDrop<B>,
    bucket: usize,
    pool: Arc<Pool<B>>,
}

impl<B> Pooled<B> {
    pub(crate) fn new(buf: B, bucket: usize, pool: Arc<Pool<B>>) -> Self {
        pool.lend(bucket);
        Pooled { buf: ManuallyDrop::new(buf), bucket, pool }
    }

    pub(crate) fn get(&self) -> &B {
        &self.buf
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn get_mut(&mut self) -> &mut B {
        &mut self.buf
    }
}

impl<B> Drop for Pooled<B> {
    fn drop(&mut self) {
        // SAFETY: `buf` is taken exactly once, here, and never touched again.
        let buf = unsafe { ManuallyDrop::take(&mut self.buf) };
        self.pool.put(self.bucket, buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_return_to_their_bucket_and_the_idle_cap_holds() {
        let pool: Arc<Pool<Vec<u8>>> = Pool::new(1024);
        assert_eq!(Pool::<Vec<u8>>::bucket(0), 256);
        assert_eq!(Pool::<Vec<u8>>::bucket(257), 512);
        let bucket = Pool::<Vec<u8>>::bucket(300);
        assert!(pool.take(bucket).is_none());
        drop(Pooled::new(vec![7u8; bucket], bucket, pool.clone()));
        let reused = pool.take(bucket).expect("the dropped buffer is idle in its bucket");
        assert_eq!(reused[0], 7);
        assert!(pool.take(bucket).is_none());
        // Past the idle cap, returned buffers are freed instead of kept.
        for _ in 0..4 {
            drop(Pooled::new(vec![0u8; 512], 512, pool.clone()));
        }
        let mut kept = 0;
        let mut loans = Vec::new();
        while let Some(b) = pool.take(512) {
            kept += 1;
            loans.push(b);
        }
        assert_eq!(kept, 2, "a 1024-byte idle cap keeps two of the four 512-byte buffers");
        pool.clear();
        assert!(pool.take(512).is_none());
    }

    #[test]
    fn live_and_peak_bytes_follow_the_loans() {
        let pool: Arc<Pool<Vec<u8>>> = Pool::new(1 << 20);
        let a = Pooled::new(vec![0u8; 256], 256, pool.clone());
        let b = Pooled::new(vec![0u8; 512], 512, pool.clone());
        assert_eq!(pool.usage(), (768, 768));
        drop(b);
        assert_eq!(pool.usage(), (256, 768), "an idle buffer is not live; the peak stays");
        pool.reset_peak();
        assert_eq!(pool.usage(), (256, 256));
        let again = Pooled::new(pool.take(512).unwrap(), 512, pool.clone());
        assert_eq!(pool.usage(), (768, 768), "a buffer taken from the pool counts again");
        drop((a, again));
        assert_eq!(pool.usage(), (0, 768));
    }
}
