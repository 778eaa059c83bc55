//! Dense tensors over shared, possibly memory-mapped, bytes.
//!
//! A [`Tensor`] is a dtype, a concrete shape and a [`Bytes`] buffer in row-major order. The
//! buffer may borrow a memory-mapped file (weights are never copied at load) or own a typed
//! `Vec`. Invariants: the buffer holds exactly `volume * dtype.size_of()` bytes and a `Bool`
//! buffer holds only 0 and 1. A borrowed buffer may be misaligned for its dtype (tensors
//! embedded in a protobuf sit at arbitrary offsets); typed access then needs
//! [`Tensor::to_aligned`], which copies that one tensor, so loading never copies weights
//! wholesale.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use half::{bf16, f16};
use ndarray::{ArrayD, ArrayViewD, IxDyn};

use crate::append::AppendBuffer;
use crate::dtype::DType;
use crate::error::RuntimeError;

/// A Rust type that stores one tensor element.
///
/// # Safety
/// `Self` must be a plain value type of `DTYPE.size_of()` bytes for which every byte pattern
/// that a [`Tensor`] of `DTYPE` can hold is a valid value (tensors keep bools as 0/1).
pub unsafe trait Element:
    Copy + Send + Sync + fmt::Debug + PartialEq + Default + 'static
{
    const DTYPE: DType;
}

macro_rules! element {
    ($($t:ty => $d:ident),* $(,)?) => {
        $(unsafe impl Element for $t { const DTYPE: DType = DType::$d; })*
    };
}
element!(f32 => F32, f64 => F64, f16 => F16, bf16 => BF16, i8 => I8, u8 => U8, i16 => I16,
         u16 => U16, i32 => I32, u32 => U32, i64 => I64, u64 => U64, bool => Bool);

/// Owns a typed vector and exposes it as bytes, keeping the element alignment.
struct TypedVec<T: Element>(Vec<T>);

impl<T: Element> AsRef<[u8]> for TypedVec<T> {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `T` is a plain value type (Element contract); the slice covers exactly the
        // initialized elements.
        unsafe {
            std::slice::from_raw_parts(
                self.0.as_ptr() as *const u8,
                std::mem::size_of_val(self.0.as_slice()),
            )
        }
    }
}

#[derive(Clone)]
pub struct Tensor {
    dtype: DType,
    shape: Vec<usize>,
    data: Bytes,
    /// When `data` is the whole committed prefix of an append buffer: that buffer, so that
    /// [`Tensor::append_outer`] can grow it in place.
    spare: Option<Arc<AppendBuffer>>,
}

impl Tensor {
    pub fn from_vec<T: Element>(shape: Vec<usize>, data: Vec<T>) -> Result<Tensor, RuntimeError> {
        let volume: usize = shape.iter().product();
        if volume != data.len() {
            return Err(RuntimeError::Tensor(format!(
                "shape {shape:?} has {volume} elements but {} were given",
                data.len()
            )));
        }
        Ok(Tensor {
            dtype: T::DTYPE,
            shape,
            data: Bytes::from_owner(TypedVec(data)),
            spare: None,
        })
    }

    pub fn scalar<T: Element>(v: T) -> Tensor {
        Tensor::from_vec(Vec::new(), vec![v]).expect("scalar volume is 1")
    }

    pub fn from_array<T: Element>(a: ArrayD<T>) -> Tensor {
        let shape = a.shape().to_vec();
        let data = if a.is_standard_layout() {
            a.into_raw_vec_and_offset().0
        } else {
            a.iter().copied().collect()
        };
        Tensor::from_vec(shape, data).expect("array volume matches its shape")
    }

    /// A tensor over `data` in little-endian row-major layout, borrowed (bool data is copied
    /// only when it holds bytes other than 0 and 1). The byte length must match the shape.
    pub fn from_bytes(
        dtype: DType,
        shape: Vec<usize>,
        data: Bytes,
    ) -> Result<Tensor, RuntimeError> {
        let volume = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| RuntimeError::Tensor(format!("shape {shape:?} overflows")))?;
        let want = volume
            .checked_mul(dtype.size_of())
            .ok_or_else(|| RuntimeError::Tensor(format!("shape {shape:?} overflows")))?;
        if data.len() != want {
            return Err(RuntimeError::Tensor(format!(
                "{dtype}{shape:?} needs {want} bytes but the data has {}",
                data.len()
            )));
        }
        let valid_bools = dtype != DType::Bool || data.iter().all(|&b| b <= 1);
        let data = if valid_bools {
            data
        } else {
            copy_aligned(dtype, &data)
        };
        Ok(Tensor {
            dtype,
            shape,
            data,
            spare: None,
        })
    }

    /// True when the data is aligned for the dtype, so typed access works without a copy.
    pub fn is_aligned(&self) -> bool {
        self.data.is_empty() || (self.data.as_ptr() as usize).is_multiple_of(self.dtype.size_of())
    }

    /// This tensor, or an aligned copy of it when its borrowed bytes are misaligned.
    pub fn to_aligned(&self) -> Tensor {
        if self.is_aligned() {
            return self.clone();
        }
        Tensor {
            dtype: self.dtype,
            shape: self.shape.clone(),
            data: copy_aligned(self.dtype, &self.data),
            spare: None,
        }
    }

    /// A tensor of zeros (false for bool).
    pub fn zeros(dtype: DType, shape: Vec<usize>) -> Tensor {
        let volume: usize = shape.iter().product();
        Tensor::from_bytes(dtype, shape, zeroed(dtype, volume)).expect("zeroed size matches")
    }

    /// An empty tensor of `shape` (whose volume must be 0) with room to grow to
    /// `capacity` elements by [`append_outer`](Self::append_outer) without copying. The room
    /// is zero-allocated, so untouched pages cost no memory.
    pub fn with_append_capacity(
        dtype: DType,
        shape: Vec<usize>,
        capacity: usize,
    ) -> Result<Tensor, RuntimeError> {
        if shape.iter().product::<usize>() != 0 {
            return Err(RuntimeError::Tensor(format!(
                "an appendable tensor starts empty, got shape {shape:?}"
            )));
        }
        let bytes = capacity
            .checked_mul(dtype.size_of())
            .ok_or_else(|| RuntimeError::Tensor(format!("{capacity} elements overflow")))?;
        let buf = AppendBuffer::with_capacity(bytes).ok_or_else(|| {
            RuntimeError::Tensor(format!(
                "cannot allocate {bytes} bytes for an appendable tensor of {capacity} {dtype} \
                 elements"
            ))
        })?;
        Ok(Tensor {
            dtype,
            shape,
            data: buf.prefix(0),
            spare: Some(buf),
        })
    }

    /// `Concat([self, tail], axis)` when every axis before `axis` has size 1 in both, so that
    /// the result is `self`'s bytes followed by `tail`'s. Writes `tail` in place after `self`
    /// when `self` is the whole committed prefix of an append buffer with room left (the
    /// result shares that buffer); otherwise copies both into a new buffer with twice the room
    /// needed, so a cache that keeps growing copies O(log n) times.
    pub fn append_outer(&self, tail: &Tensor, axis: usize) -> Result<Tensor, RuntimeError> {
        let bad = |msg: String| RuntimeError::Tensor(format!("append: {msg}"));
        if self.dtype != tail.dtype {
            return Err(bad(format!("{} after {}", tail.dtype, self.dtype)));
        }
        let r = self.rank();
        if tail.rank() != r || axis >= r {
            return Err(bad(format!(
                "{:?} after {:?} along axis {axis}",
                tail.shape, self.shape
            )));
        }
        let fits = (0..r).all(|a| a == axis || self.shape[a] == tail.shape[a])
            && self.shape[..axis].iter().all(|&d| d == 1);
        if !fits {
            return Err(bad(format!(
                "{:?} after {:?} along axis {axis}: the other axes must agree and the ones \
                 before it be 1",
                tail.shape, self.shape
            )));
        }
        let mut shape = self.shape.clone();
        shape[axis] += tail.shape[axis];
        let (head_len, total) = (self.data.len(), self.data.len() + tail.data.len());
        if let Some(buf) = &self.spare {
            let starts_buffer = head_len == 0 || buf.as_ptr() == self.data.as_ptr();
            if starts_buffer && buf.try_append(head_len, &tail.data) {
                return Ok(Tensor {
                    dtype: self.dtype,
                    shape,
                    data: buf.prefix(total),
                    spare: Some(Arc::clone(buf)),
                });
            }
        }
        let room = total.saturating_mul(2).max(64);
        let buf = AppendBuffer::with_capacity(room)
            .or_else(|| AppendBuffer::with_capacity(total.max(64)))
            .ok_or_else(|| bad(format!("cannot allocate {total} bytes")))?;
        let appended = buf.try_append(0, &self.data) && buf.try_append(head_len, &tail.data);
        debug_assert!(appended, "a fresh buffer has room for both");
        Ok(Tensor {
            dtype: self.dtype,
            shape,
            data: buf.prefix(total),
            spare: Some(buf),
        })
    }

    /// Bytes this tensor can still grow by in place (0 unless it owns an append buffer's
    /// whole committed prefix).
    pub fn append_room(&self) -> usize {
        match &self.spare {
            Some(buf) if buf.committed() == self.data.len() => buf.capacity() - self.data.len(),
            _ => 0,
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The raw little-endian bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.data
    }

    /// True when the tensor's bytes live inside `region` (a memory-mapped file, say).
    pub fn borrows_from(&self, region: &[u8]) -> bool {
        let start = region.as_ptr() as usize;
        let p = self.data.as_ptr() as usize;
        !self.data.is_empty() && p >= start && p + self.data.len() <= start + region.len()
    }

    pub fn as_slice<T: Element>(&self) -> Result<&[T], RuntimeError> {
        if T::DTYPE != self.dtype {
            return Err(RuntimeError::Tensor(format!(
                "tensor is {} but {} was requested",
                self.dtype,
                T::DTYPE
            )));
        }
        if self.data.is_empty() {
            return Ok(&[]);
        }
        if !self.is_aligned() {
            return Err(RuntimeError::Tensor(format!(
                "{}{:?} data is not aligned for its element type",
                self.dtype, self.shape
            )));
        }
        // SAFETY: dtype matches T; the buffer is aligned for T (checked) and holds `len()`
        // valid elements (struct invariants).
        Ok(unsafe { std::slice::from_raw_parts(self.data.as_ptr() as *const T, self.len()) })
    }

    pub fn view<T: Element>(&self) -> Result<ArrayViewD<'_, T>, RuntimeError> {
        let s = self.as_slice::<T>()?;
        Ok(ArrayViewD::from_shape(IxDyn(&self.shape), s).expect("shape matches length"))
    }

    pub fn to_array<T: Element>(&self) -> Result<ArrayD<T>, RuntimeError> {
        Ok(self.view::<T>()?.to_owned())
    }

    /// The last `k` positions of a `[b, s, w]` tensor along its axis 1 (`k ≤ s`): a view of
    /// the same bytes when `b` is 1, else a copy.
    pub fn last_positions(&self, k: usize) -> Result<Tensor, RuntimeError> {
        let &[b, s, w] = self.shape.as_slice() else {
            return Err(RuntimeError::Tensor(format!(
                "last positions of {:?}: expected rank 3",
                self.shape
            )));
        };
        if k > s {
            return Err(RuntimeError::Tensor(format!(
                "last {k} positions of {:?}: there are only {s}",
                self.shape
            )));
        }
        let row = w * self.dtype.size_of();
        let data = if b == 1 {
            self.data.slice((s - k) * row..s * row)
        } else {
            let mut out = Vec::with_capacity(b * k * row);
            for batch in self.data.chunks_exact(s * row) {
                out.extend_from_slice(&batch[(s - k) * row..]);
            }
            copy_aligned(self.dtype, &out)
        };
        Ok(Tensor {
            dtype: self.dtype,
            shape: vec![b, k, w],
            data,
            spare: None,
        })
    }

    /// Same data, new shape of equal volume.
    pub fn reshaped(&self, shape: Vec<usize>) -> Result<Tensor, RuntimeError> {
        if shape.iter().product::<usize>() != self.len() {
            return Err(RuntimeError::Tensor(format!(
                "cannot reshape {:?} into {shape:?}",
                self.shape
            )));
        }
        Ok(Tensor {
            dtype: self.dtype,
            shape,
            data: self.data.clone(),
            spare: self.spare.clone(),
        })
    }

    /// Integer elements widened to i64 (for shape, index and axis inputs).
    pub fn to_i64_vec(&self) -> Result<Vec<i64>, RuntimeError> {
        if !self.is_aligned() {
            return self.to_aligned().to_i64_vec();
        }
        Ok(match self.dtype {
            DType::I64 => self.as_slice::<i64>()?.to_vec(),
            DType::I32 => self.as_slice::<i32>()?.iter().map(|&v| v as i64).collect(),
            DType::I16 => self.as_slice::<i16>()?.iter().map(|&v| v as i64).collect(),
            DType::I8 => self.as_slice::<i8>()?.iter().map(|&v| v as i64).collect(),
            DType::U8 => self.as_slice::<u8>()?.iter().map(|&v| v as i64).collect(),
            DType::U16 => self.as_slice::<u16>()?.iter().map(|&v| v as i64).collect(),
            DType::U32 => self.as_slice::<u32>()?.iter().map(|&v| v as i64).collect(),
            DType::U64 => self.as_slice::<u64>()?.iter().map(|&v| v as i64).collect(),
            DType::Bool => self.as_slice::<bool>()?.iter().map(|&v| v as i64).collect(),
            d => {
                return Err(RuntimeError::Tensor(format!(
                    "expected an integer tensor, got {d}"
                )))
            }
        })
    }

    /// Elements converted to f64 (any dtype), for comparisons and reports.
    pub fn to_f64_vec(&self) -> Result<Vec<f64>, RuntimeError> {
        if !self.is_aligned() {
            return self.to_aligned().to_f64_vec();
        }
        Ok(match self.dtype {
            DType::F32 => self.as_slice::<f32>()?.iter().map(|&v| v as f64).collect(),
            DType::F64 => self.as_slice::<f64>()?.to_vec(),
            DType::F16 => self.as_slice::<f16>()?.iter().map(|v| v.to_f64()).collect(),
            DType::BF16 => self
                .as_slice::<bf16>()?
                .iter()
                .map(|v| v.to_f64())
                .collect(),
            _ => self.to_i64_vec()?.into_iter().map(|v| v as f64).collect(),
        })
    }
}

/// The largest tensor an op may make, in bytes: the machine's physical memory unless
/// [`set_max_tensor_bytes`] lowered it. Ops whose output size comes from values (Range,
/// ConstantOfShape, Expand, Tile, ...) check it before allocating, so that a shape of 10^15
/// elements is an error naming the op, not an abort.
pub fn max_tensor_bytes() -> usize {
    match MAX_TENSOR_BYTES.load(std::sync::atomic::Ordering::Relaxed) {
        0 => physical_memory(),
        n => n,
    }
}

/// Lowers (or, with 0, resets to the machine's memory) the limit of [`max_tensor_bytes`] for
/// the whole process: a server capping what one request may allocate, or a fuzzer.
pub fn set_max_tensor_bytes(bytes: usize) {
    MAX_TENSOR_BYTES.store(bytes, std::sync::atomic::Ordering::Relaxed);
}

static MAX_TENSOR_BYTES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Physical memory in bytes (`MemTotal` of /proc/meminfo), or 2^40 where it cannot be read.
fn physical_memory() -> usize {
    static MEMORY: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MEMORY.get_or_init(|| {
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
                let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
                kib.checked_mul(1024)
            })
            .unwrap_or(1 << 40)
    })
}

/// Checks that `elements` of `dtype` fit under [`max_tensor_bytes`]; the error names `what`.
pub fn check_tensor_size(dtype: DType, elements: usize, what: &str) -> Result<(), String> {
    let limit = max_tensor_bytes();
    match elements.checked_mul(dtype.size_of()) {
        Some(bytes) if bytes <= limit => Ok(()),
        _ => Err(format!(
            "{what} would make {elements} {dtype} elements, more than the {limit} bytes one tensor may take on this machine"
        )),
    }
}

fn zeroed(dtype: DType, volume: usize) -> Bytes {
    match dtype.size_of() {
        1 => Bytes::from_owner(TypedVec(vec![0u8; volume])),
        2 => Bytes::from_owner(TypedVec(vec![0u16; volume])),
        4 => Bytes::from_owner(TypedVec(vec![0u32; volume])),
        _ => Bytes::from_owner(TypedVec(vec![0u64; volume])),
    }
}

/// Copies `src` into a buffer aligned for `dtype`, normalizing bools to 0/1.
fn copy_aligned(dtype: DType, src: &[u8]) -> Bytes {
    match dtype.size_of() {
        1 => {
            let v: Vec<u8> = if dtype == DType::Bool {
                src.iter().map(|&b| (b != 0) as u8).collect()
            } else {
                src.to_vec()
            };
            Bytes::from_owner(TypedVec(v))
        }
        2 => Bytes::from_owner(TypedVec(
            src.chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect::<Vec<u16>>(),
        )),
        4 => Bytes::from_owner(TypedVec(
            src.chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect::<Vec<u32>>(),
        )),
        _ => Bytes::from_owner(TypedVec(
            src.chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect::<Vec<u64>>(),
        )),
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor<{}>{:?}", self.dtype, self.shape)?;
        if self.len() <= 16 {
            if let Ok(v) = self.to_f64_vec() {
                write!(f, " {v:?}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_positions_view_one_sequence_and_copy_several() {
        let t = Tensor::from_vec(vec![1, 3, 2], (0..6).map(|v| v as f32).collect()).unwrap();
        let tail = t.last_positions(2).unwrap();
        assert_eq!(tail.shape(), &[1, 2, 2]);
        assert_eq!(tail.as_slice::<f32>().unwrap(), &[2.0, 3.0, 4.0, 5.0]);
        assert_eq!(
            tail.bytes().as_ptr(),
            t.bytes()[8..].as_ptr(),
            "one sequence: a view"
        );
        let t = Tensor::from_vec(vec![2, 3, 1], (0..6).map(|v| v as f32).collect()).unwrap();
        let tail = t.last_positions(1).unwrap();
        assert_eq!(tail.as_slice::<f32>().unwrap(), &[2.0, 5.0]);
        assert!(t.last_positions(4).is_err());
        assert!(Tensor::scalar(1f32).last_positions(1).is_err());
    }

    #[test]
    fn misaligned_bytes_are_borrowed_and_aligned_on_demand() {
        let owned = Tensor::from_vec(vec![5], vec![1f32, 2., 3., 4., 5.]).unwrap();
        let unaligned = owned.bytes().slice(1..17);
        let t = Tensor::from_bytes(DType::F32, vec![4], unaligned.clone()).unwrap();
        assert!(t.borrows_from(owned.bytes()) && !t.is_aligned());
        assert!(t.as_slice::<f32>().is_err());
        let a = t.to_aligned();
        assert!(a.is_aligned());
        assert_eq!(a.as_slice::<f32>().unwrap().len(), 4);
        assert_eq!(&a.bytes()[..], &unaligned[..]);
        let owned = Tensor::from_vec(vec![2, 2], vec![1f32, 2., 3., 4.]).unwrap();
        let again = Tensor::from_bytes(DType::F32, vec![4], owned.bytes().clone()).unwrap();
        assert!(again.borrows_from(owned.bytes()));
    }

    #[test]
    fn size_mismatch_and_dtype_mismatch_are_errors() {
        let err = Tensor::from_bytes(DType::F32, vec![3], Bytes::from(vec![0u8; 8])).unwrap_err();
        assert!(err.to_string().contains("needs 12 bytes"), "{err}");
        let t = Tensor::scalar(3i64);
        assert!(t.as_slice::<f32>().is_err());
        assert_eq!(t.to_i64_vec().unwrap(), vec![3]);
    }

    #[test]
    fn bools_are_normalized() {
        let t = Tensor::from_bytes(DType::Bool, vec![3], Bytes::from(vec![0u8, 2, 1])).unwrap();
        assert_eq!(t.as_slice::<bool>().unwrap(), &[false, true, true]);
    }
}
