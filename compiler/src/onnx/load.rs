//! Loading ONNX files: the model is memory-mapped and decoded with tensor bytes borrowed from
//! the map; external data files (`model.onnx.data`) are memory-mapped once each and tensors
//! are slices of them. No weight is copied unless its bytes are misaligned for its dtype.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

use bytes::Bytes;
use patch_runtime::{DType, Tensor};
use prost::Message;

use super::proto::{tensor_proto, ModelProto, TensorProto};

/// Errors of reading an ONNX model or one of its tensors, each naming the file or tensor.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read `{path}`: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{path}` is not a valid ONNX model (protobuf decoding failed: {source}); is the file truncated or not ONNX?")]
    Decode {
        path: PathBuf,
        #[source]
        source: prost::DecodeError,
    },
    #[error("`{path}` is empty")]
    Empty { path: PathBuf },
    #[error("`{path}` is a directory; give the model file in it (for example `{}`)", path.join("model.onnx").display())]
    Directory { path: PathBuf },
    #[error("tensor `{tensor}`: {msg}")]
    Tensor { tensor: String, msg: String },
    #[error("tensor `{tensor}`: external data file `{file}`: {msg}")]
    ExternalData {
        tensor: String,
        file: PathBuf,
        msg: String,
    },
}

/// A decoded model plus what is needed to resolve its external data.
pub struct OnnxModel {
    pub proto: ModelProto,
    /// The model file the proto was decoded from.
    pub path: PathBuf,
    /// The bytes of the model file (memory-mapped).
    pub file_bytes: Bytes,
    external: ExternalFiles,
}

/// Memory maps of external data files, opened on first use.
struct ExternalFiles {
    dir: PathBuf,
    maps: Mutex<HashMap<PathBuf, Bytes>>,
}

fn map_file(path: &Path) -> Result<Bytes, LoadError> {
    let io = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    if len == 0 {
        return Ok(Bytes::new());
    }
    // SAFETY: the map is read-only; like every mmap-based loader we rely on the file not being
    // truncated while the model is in use.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
    Ok(Bytes::from_owner(map))
}

/// Reads and decodes the model at `path` (tensors stay in the memory-mapped file).
pub fn load_model(path: impl AsRef<Path>) -> Result<OnnxModel, LoadError> {
    let path = path.as_ref().to_path_buf();
    if path.is_dir() {
        return Err(LoadError::Directory { path });
    }
    let file_bytes = map_file(&path)?;
    if file_bytes.is_empty() {
        return Err(LoadError::Empty { path });
    }
    let proto = ModelProto::decode(file_bytes.clone()).map_err(|source| LoadError::Decode {
        path: path.clone(),
        source,
    })?;
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    Ok(OnnxModel {
        proto,
        path,
        file_bytes,
        external: ExternalFiles {
            dir,
            maps: Mutex::new(HashMap::new()),
        },
    })
}

impl OnnxModel {
    /// Decodes a model held in memory; external data resolves relative to `dir`.
    pub fn from_bytes(bytes: Bytes, dir: impl Into<PathBuf>) -> Result<OnnxModel, LoadError> {
        let dir = dir.into();
        let proto = ModelProto::decode(bytes.clone()).map_err(|source| LoadError::Decode {
            path: dir.join("<memory>"),
            source,
        })?;
        Ok(OnnxModel {
            proto,
            path: dir.join("<memory>"),
            file_bytes: bytes,
            external: ExternalFiles {
                dir,
                maps: Mutex::new(HashMap::new()),
            },
        })
    }

    /// The tensor of an initializer or attribute, resolving external data.
    pub fn tensor(&self, t: &TensorProto) -> Result<Tensor, LoadError> {
        tensor_from_proto(t, Some(&self.external_lookup()))
    }

    fn external_lookup(&self) -> impl Fn(&str, &str) -> Result<Bytes, LoadError> + '_ {
        move |tensor, location| self.external.get(tensor, location)
    }

    /// The directory external data paths are relative to.
    pub fn dir(&self) -> &Path {
        &self.external.dir
    }

    /// Re-encodes the proto. For a model decoded from a canonical encoder's output this
    /// reproduces the file byte for byte (the schema is current, so no field is dropped).
    pub fn encode(&self) -> Vec<u8> {
        self.proto.encode_to_vec()
    }
}

impl ExternalFiles {
    fn get(&self, tensor: &str, location: &str) -> Result<Bytes, LoadError> {
        let rel = Path::new(location);
        let escapes = rel.is_absolute()
            || rel
                .components()
                .any(|c| matches!(c, Component::ParentDir | Component::Prefix(_)));
        if location.is_empty() || escapes {
            return Err(LoadError::ExternalData {
                tensor: tensor.to_string(),
                file: rel.to_path_buf(),
                msg: "the location must be a relative path inside the model's directory".into(),
            });
        }
        let path = self.dir.join(rel);
        let mut maps = self.maps.lock().expect("external map lock poisoned");
        if let Some(b) = maps.get(&path) {
            return Ok(b.clone());
        }
        let bytes = map_file(&path).map_err(|e| LoadError::ExternalData {
            tensor: tensor.to_string(),
            file: path.clone(),
            msg: match e {
                LoadError::Io { source, .. } => source.to_string(),
                other => other.to_string(),
            },
        })?;
        maps.insert(path, bytes.clone());
        Ok(bytes)
    }
}

/// Resolves `(tensor name, location)` to the bytes of an external data file.
pub type ExternalResolver<'a> = &'a dyn Fn(&str, &str) -> Result<Bytes, LoadError>;

/// Converts a `TensorProto` into a runtime tensor. `external` resolves
/// `(tensor name, location)` to the bytes of an external data file; without it, external
/// tensors are an error.
pub fn tensor_from_proto(
    t: &TensorProto,
    external: Option<ExternalResolver<'_>>,
) -> Result<Tensor, LoadError> {
    let name = t.name.clone().unwrap_or_default();
    let err = |msg: String| LoadError::Tensor {
        tensor: name.clone(),
        msg,
    };
    let code = t.data_type.unwrap_or(0);
    let dtype = DType::from_onnx(code).ok_or_else(|| {
        err(format!(
            "unsupported element type {} (code {code})",
            tensor_proto::DataType::try_from(code)
                .map(|d| d.as_str_name().to_string())
                .unwrap_or_else(|_| "unknown".into())
        ))
    })?;
    if t.segment.is_some() {
        return Err(err("segmented tensors are not supported".into()));
    }
    let mut shape = Vec::with_capacity(t.dims.len());
    for &d in &t.dims {
        if d < 0 {
            return Err(err(format!("negative dimension {d} in {:?}", t.dims)));
        }
        shape.push(d as usize);
    }
    let volume = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| err(format!("shape {shape:?} overflows")))?;
    let want_bytes = volume
        .checked_mul(dtype.size_of())
        .ok_or_else(|| err(format!("shape {shape:?} overflows")))?;
    let external_location = t.data_location == Some(tensor_proto::DataLocation::External as i32);
    let make = |bytes: Bytes| {
        if bytes.len() != want_bytes {
            return Err(err(format!(
                "{dtype}{shape:?} needs {want_bytes} bytes but the data has {}",
                bytes.len()
            )));
        }
        Tensor::from_bytes(dtype, shape.clone(), bytes).map_err(|e| err(e.to_string()))
    };

    if external_location {
        let entry = |key: &str| {
            t.external_data
                .iter()
                .find(|e| e.key.as_deref() == Some(key))
                .and_then(|e| e.value.clone())
        };
        let location =
            entry("location").ok_or_else(|| err("external data without a location".into()))?;
        let parse = |key: &str| -> Result<Option<usize>, LoadError> {
            entry(key)
                .map(|v| {
                    v.parse::<usize>()
                        .map_err(|_| err(format!("external data {key} `{v}` is not a number")))
                })
                .transpose()
        };
        let offset = parse("offset")?.unwrap_or(0);
        let resolve =
            external.ok_or_else(|| err("external data cannot be resolved here".into()))?;
        let file = resolve(&name, &location)?;
        let length = parse("length")?.unwrap_or(file.len().saturating_sub(offset));
        let end = offset
            .checked_add(length)
            .filter(|&e| e <= file.len())
            .ok_or_else(|| LoadError::ExternalData {
                tensor: name.clone(),
                file: PathBuf::from(&location),
                msg: format!(
                    "range {offset}..{} is outside the file ({} bytes); is it truncated?",
                    offset.saturating_add(length),
                    file.len()
                ),
            })?;
        return make(file.slice(offset..end));
    }

    if let Some(raw) = &t.raw_data {
        return make(raw.clone());
    }
    // Typed fields, as the ONNX spec lays them out per dtype.
    let typed = |n: usize| -> Result<(), LoadError> {
        if n != volume {
            return Err(err(format!(
                "{dtype}{shape:?} has {volume} elements but the data has {n}"
            )));
        }
        Ok(())
    };
    let result = match dtype {
        DType::F32 => {
            typed(t.float_data.len())?;
            Tensor::from_vec(shape.clone(), t.float_data.clone())
        }
        DType::F64 => {
            typed(t.double_data.len())?;
            Tensor::from_vec(shape.clone(), t.double_data.clone())
        }
        DType::I64 => {
            typed(t.int64_data.len())?;
            Tensor::from_vec(shape.clone(), t.int64_data.clone())
        }
        DType::U32 | DType::U64 => {
            typed(t.uint64_data.len())?;
            let v = &t.uint64_data;
            if dtype == DType::U64 {
                Tensor::from_vec(shape.clone(), v.clone())
            } else {
                Tensor::from_vec(shape.clone(), v.iter().map(|&x| x as u32).collect())
            }
        }
        _ => {
            // int32_data carries int32, int16, int8, uint16, uint8, bool, and the bit
            // patterns of float16 and bfloat16.
            typed(t.int32_data.len())?;
            let v = &t.int32_data;
            match dtype {
                DType::I32 => Tensor::from_vec(shape.clone(), v.clone()),
                DType::I16 => {
                    Tensor::from_vec(shape.clone(), v.iter().map(|&x| x as i16).collect())
                }
                DType::I8 => Tensor::from_vec(shape.clone(), v.iter().map(|&x| x as i8).collect()),
                DType::U16 => {
                    Tensor::from_vec(shape.clone(), v.iter().map(|&x| x as u16).collect())
                }
                DType::U8 => Tensor::from_vec(shape.clone(), v.iter().map(|&x| x as u8).collect()),
                DType::Bool => Tensor::from_vec(shape.clone(), v.iter().map(|&x| x != 0).collect()),
                DType::F16 => Tensor::from_vec(
                    shape.clone(),
                    v.iter().map(|&x| half::f16::from_bits(x as u16)).collect(),
                ),
                DType::BF16 => Tensor::from_vec(
                    shape.clone(),
                    v.iter().map(|&x| half::bf16::from_bits(x as u16)).collect(),
                ),
                other => return Err(err(format!("no typed data field for {other}"))),
            }
        }
    };
    result.map_err(|e| err(e.to_string()))
}
