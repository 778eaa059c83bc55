//! Reusable activation buffers: the slots of the executor's memory plan.
//!
//! A [`Slot`] holds one `f32` buffer between the values the plan assigns to it. An op asks its
//! [`Outputs`] for an output buffer ([`Outputs::f32`]); the buffer comes out of the output's
//! slot when it is there and large enough, and a tensor made from it ([`OutBuf::into_tensor`])
//! puts it back when its last reference is dropped. So a buffer is never handed out while
//! anything still reads it, whatever the plan says: a plan that misjudges a lifetime (a view
//! that outlives its source, an output the caller keeps) costs a fresh allocation, counted as
//! a miss, never a wrong result.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::dtype::DType;
use crate::error::RuntimeError;
use crate::tensor::Tensor;

/// One buffer of the memory plan, shared in turn by the values assigned to it.
#[derive(Debug)]
pub struct Slot {
    /// The idle buffer, or `None` while a tensor holds it.
    idle: Mutex<Option<Vec<f32>>>,
    /// Buffers handed out from the slot.
    hits: AtomicU64,
    /// Requests the slot could not serve (its buffer was in use or too small), and
    /// reservations that had to grow it.
    misses: AtomicU64,
}

impl Default for Slot {
    fn default() -> Slot {
        Slot {
            idle: Mutex::new(Some(Vec::new())),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }
}

impl Slot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Vec<f32>>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the idle buffer hold at least `len` elements, so that the call about to run
    /// finds it large enough; nothing while a tensor holds the buffer. A buffer grows to at
    /// least twice its size, so a size that creeps up (the positions of a growing context)
    /// regrows it O(log n) times. A size past [`crate::tensor::max_tensor_bytes`], or one the
    /// allocator refuses, is an error and allocates nothing.
    pub fn reserve(&self, len: usize) -> Result<(), String> {
        let mut idle = self.lock();
        let Some(buf) = idle.as_mut() else {
            return Ok(());
        };
        let had = buf.capacity();
        if had < len {
            crate::tensor::check_tensor_size(crate::DType::F32, len, "a slot of the memory plan")?;
            if had > 0 {
                self.misses.fetch_add(1, Ordering::Relaxed);
            }
            let mut grown = Vec::new();
            grown
                .try_reserve_exact(len.max(2 * had))
                .or_else(|_| grown.try_reserve_exact(len))
                .map_err(|_| {
                    format!("cannot allocate {len} f32 elements for a slot of the memory plan")
                })?;
            *buf = grown;
        }
        Ok(())
    }

    /// `len` zeros in the idle buffer, or in a new one when it is in use or too small.
    fn take(self: &Arc<Slot>, len: usize) -> Vec<f32> {
        if len == 0 {
            return Vec::new();
        }
        let mut idle = self.lock();
        let mut v = match idle.take() {
            Some(v) if v.capacity() >= len => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                v
            }
            small => {
                // Too small: it stays idle for a smaller value.
                *idle = small;
                self.misses.fetch_add(1, Ordering::Relaxed);
                Vec::with_capacity(len)
            }
        };
        drop(idle);
        v.clear();
        v.resize(len, 0.0);
        v
    }

    /// Keeps `v` as the idle buffer unless a larger one came back first.
    fn put_back(&self, v: Vec<f32>) {
        if v.capacity() == 0 {
            return;
        }
        let mut idle = self.lock();
        if idle.as_ref().is_none_or(|b| v.capacity() > b.capacity()) {
            *idle = Some(v);
        }
    }

    /// Capacity of the idle buffer, in bytes (0 while a tensor holds it).
    pub fn idle_bytes(&self) -> usize {
        self.lock().as_ref().map_or(0, Vec::capacity) * std::mem::size_of::<f32>()
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }
}

/// Where the outputs of one node come from: per output index, its slot, if the plan gave it
/// one. [`Outputs::none`] allocates every output.
#[derive(Clone, Copy, Debug)]
pub struct Outputs<'a> {
    slots: &'a [Arc<Slot>],
    /// Slot index of each output (`None`: not planned).
    of_output: &'a [Option<u32>],
}

impl Outputs<'static> {
    /// Outputs that are always freshly allocated.
    pub fn none() -> Outputs<'static> {
        Outputs {
            slots: &[],
            of_output: &[],
        }
    }
}

impl<'a> Outputs<'a> {
    pub fn new(slots: &'a [Arc<Slot>], of_output: &'a [Option<u32>]) -> Outputs<'a> {
        Outputs { slots, of_output }
    }

    /// A zeroed buffer of `len` elements for output `index`.
    pub fn f32(&self, index: usize, len: usize) -> OutBuf {
        let slot = self
            .of_output
            .get(index)
            .copied()
            .flatten()
            .and_then(|s| self.slots.get(s as usize));
        match slot {
            Some(slot) => OutBuf {
                data: slot.take(len),
                home: Some(slot.clone()),
            },
            None => OutBuf {
                data: vec![0.0; len],
                home: None,
            },
        }
    }
}

/// An output buffer being written; becomes a tensor with [`OutBuf::into_tensor`].
#[derive(Debug)]
pub struct OutBuf {
    data: Vec<f32>,
    home: Option<Arc<Slot>>,
}

impl OutBuf {
    /// The tensor of `shape` over this buffer (whose length must be the shape's volume). A
    /// buffer from a slot goes back to it when the tensor's last reference is dropped.
    pub fn into_tensor(self, shape: Vec<usize>) -> Result<Tensor, RuntimeError> {
        let OutBuf { data, home } = self;
        match home {
            None => Tensor::from_vec(shape, data),
            Some(home) => {
                let bytes = Bytes::from_owner(Lent { data, home });
                Tensor::from_bytes(DType::F32, shape, bytes)
            }
        }
    }
}

impl Deref for OutBuf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.data
    }
}

impl DerefMut for OutBuf {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }
}

/// A slot's buffer while a tensor holds it; returns it to the slot on drop.
struct Lent {
    data: Vec<f32>,
    home: Arc<Slot>,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: f32 is a plain value type; the slice covers exactly the initialized elements.
        unsafe {
            std::slice::from_raw_parts(
                self.data.as_ptr() as *const u8,
                std::mem::size_of_val(self.data.as_slice()),
            )
        }
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        self.home.put_back(std::mem::take(&mut self.data));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_returns_to_its_slot_only_when_its_last_reader_is_gone() {
        let slots = vec![Arc::new(Slot::default())];
        let of_output = [Some(0)];
        let out = Outputs::new(&slots, &of_output);
        slots[0].reserve(8).unwrap();
        let mut a = out.f32(0, 6);
        a[5] = 3.0;
        let a = a.into_tensor(vec![2, 3]).unwrap();
        let ptr = a.as_slice::<f32>().unwrap().as_ptr();
        assert_eq!((slots[0].hits(), slots[0].misses()), (1, 0));
        // Held by a clone: a second request cannot have it.
        let view = a.reshaped(vec![6]).unwrap();
        drop(a);
        // Nor does a reservation replace it while it is lent.
        slots[0].reserve(100).unwrap();
        assert_eq!(slots[0].idle_bytes(), 0);
        let b = out.f32(0, 4).into_tensor(vec![4]).unwrap();
        assert_ne!(b.as_slice::<f32>().unwrap().as_ptr(), ptr);
        assert_eq!(slots[0].misses(), 1);
        assert_eq!(view.as_slice::<f32>().unwrap()[5], 3.0);
        drop(b);
        drop(view);
        // Both came back; the slot keeps the larger (the first, of capacity 8).
        assert_eq!(slots[0].idle_bytes(), 32);
        let c = out.f32(0, 8);
        assert_eq!(c.as_ptr(), ptr);
        assert!(c.iter().all(|&x| x == 0.0), "a reused buffer is zeroed");
    }

    #[test]
    fn unplanned_outputs_are_allocated() {
        let t = Outputs::none().f32(0, 3).into_tensor(vec![3]).unwrap();
        assert_eq!(t.as_slice::<f32>().unwrap(), &[0.0; 3]);
        let slots = vec![Arc::new(Slot::default())];
        let out = Outputs::new(&slots, &[None, Some(0)]);
        let _ = out.f32(0, 2);
        assert_eq!(slots[0].hits() + slots[0].misses(), 0);
        assert!(
            out.f32(1, 2).into_tensor(vec![3]).is_err(),
            "volume is checked"
        );
    }
}
