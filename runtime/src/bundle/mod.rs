//! The `.patch` bundle: one file holding a compiled graph, its weights, the tokenizer,
//! generation metadata and the compile report.
//!
//! Layout (format version 1, all integers little-endian):
//!
//! ```text
//! offset  size  field
//! 0       8     magic "PATCHBND"
//! 8       4     format version (1)
//! 12      4     header length (64)
//! 16      8     manifest offset (64)
//! 24      8     manifest length
//! 32      8     data offset (a multiple of 64, after the manifest)
//! 40      8     data length
//! 48      4     CRC-32 of the manifest bytes followed by the data bytes
//! 52      12    zero
//! 64      ...   manifest (protobuf `patch.bundle.Manifest`, see proto/bundle.proto)
//! ...     ...   zero padding to the data offset
//! data    ...   tensors, each starting at a multiple of 64 bytes from the data offset
//! ```
//!
//! Loading memory-maps the file: tensors are slices of the map (64-byte aligned, so typed
//! access never copies). Writing streams tensors to a temporary file in the target directory
//! and renames it at the end, so a failed write never leaves a partial bundle.

mod manifest;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use prost::Message;

use crate::atomic::AtomicFile;
use crate::error::RuntimeError;
use crate::ir::Graph;
use crate::ops::OpRegistry;

pub use manifest::proto;

pub const MAGIC: [u8; 8] = *b"PATCHBND";
pub const FORMAT_VERSION: u32 = 1;
/// Alignment of the data section and of every tensor in it.
pub const ALIGN: usize = 64;
const HEADER_LEN: usize = 64;

/// Errors of reading or writing a bundle, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot access bundle `{path}`: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{path}` is not a PATCH bundle (bad magic); compile one with `patchc compile`")]
    BadMagic { path: PathBuf },
    #[error("`{path}` is bundle format version {found}, this build reads version {FORMAT_VERSION}; recompile it with this patchc")]
    Version { path: PathBuf, found: u32 },
    #[error(
        "`{path}` is truncated: the header announces {expected} bytes but the file has {actual}"
    )]
    Truncated {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error(
        "`{path}` has {} bytes after its end: the header announces {expected} bytes but the file has {actual} (something was appended to it)",
        actual - expected
    )]
    TrailingBytes {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("`{path}` is corrupt: checksum {computed:08x} does not match the stored {stored:08x}")]
    Checksum {
        path: PathBuf,
        stored: u32,
        computed: u32,
    },
    #[error("`{path}` is corrupt: {msg}")]
    Corrupt { path: PathBuf, msg: String },
    #[error("`{path}`: {source}")]
    Graph {
        path: PathBuf,
        #[source]
        source: RuntimeError,
    },
}

/// Token and chat metadata a generation loop needs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Generation {
    pub eos_token_ids: Vec<i64>,
    pub bos_token_id: Option<i64>,
    pub chat_template: Option<String>,
    /// Maximum sequence length, when known.
    pub max_context: Option<u64>,
    /// `add_bos_token` of the tokenizer configuration, when it states one: whether a plain
    /// prompt starts with BOS. `None`: the tokenizer.json post-processor decides.
    pub add_bos_token: Option<bool>,
}

/// Everything a bundle holds besides its framing.
#[derive(Clone, Debug, Default)]
pub struct BundleContents {
    pub graph: Graph,
    /// The Hugging Face `tokenizer.json` bytes, if any.
    pub tokenizer_json: Option<Bytes>,
    pub generation: Generation,
    pub compile_report_json: String,
    pub metadata: BTreeMap<String, String>,
}

/// A loaded bundle; its tensors borrow the memory map.
#[derive(Debug)]
pub struct Bundle {
    pub path: PathBuf,
    pub contents: BundleContents,
    /// Size of the file in bytes.
    pub file_len: u64,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `contents` to `path` atomically (temporary file, then rename).
pub fn write_bundle(path: &Path, contents: &BundleContents) -> Result<(), BundleError> {
    let (manifest, tensors) = manifest::encode(contents);
    let manifest_bytes = manifest.encode_to_vec();
    let data_offset = (HEADER_LEN + manifest_bytes.len()).next_multiple_of(ALIGN);
    let data_len = manifest
        .tensors
        .iter()
        .map(|t| t.offset + t.length)
        .max()
        .unwrap_or(0);

    let err = io_err(path);
    let mut out = AtomicFile::create(path).map_err(&err)?;
    {
        let mut w = BufWriter::with_capacity(1 << 20, out.file());
        w.write_all(&[0u8; HEADER_LEN]).map_err(&err)?;
        let mut crc = crc32fast::Hasher::new();
        w.write_all(&manifest_bytes).map_err(&err)?;
        crc.update(&manifest_bytes);
        let pad = [0u8; ALIGN];
        w.write_all(&pad[..data_offset - HEADER_LEN - manifest_bytes.len()])
            .map_err(&err)?;
        let mut written = 0u64;
        for (entry, t) in manifest.tensors.iter().zip(&tensors) {
            let gap = (entry.offset - written) as usize;
            w.write_all(&pad[..gap]).map_err(&err)?;
            crc.update(&pad[..gap]);
            w.write_all(t.bytes()).map_err(&err)?;
            crc.update(t.bytes());
            written = entry.offset + entry.length;
        }
        let mut header = [0u8; HEADER_LEN];
        header[0..8].copy_from_slice(&MAGIC);
        header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        header[16..24].copy_from_slice(&(HEADER_LEN as u64).to_le_bytes());
        header[24..32].copy_from_slice(&(manifest_bytes.len() as u64).to_le_bytes());
        header[32..40].copy_from_slice(&(data_offset as u64).to_le_bytes());
        header[40..48].copy_from_slice(&data_len.to_le_bytes());
        header[48..52].copy_from_slice(&crc.finalize().to_le_bytes());
        let file = w.into_inner().map_err(|e| err(e.into_error()))?;
        file.seek(SeekFrom::Start(0)).map_err(&err)?;
        file.write_all(&header).map_err(&err)?;
    }
    out.commit().map_err(err)
}

/// Options for [`load_bundle`].
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Check the CRC of the manifest and data (reads every page once).
    pub verify_checksum: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            verify_checksum: true,
        }
    }
}

fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn read_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Memory-maps and decodes the bundle at `path`, rebuilding and verifying its graph.
pub fn load_bundle(
    path: &Path,
    registry: &OpRegistry,
    options: LoadOptions,
) -> Result<Bundle, BundleError> {
    let file = File::open(path).map_err(io_err(path))?;
    let file_len = file.metadata().map_err(io_err(path))?.len();
    if file_len < HEADER_LEN as u64 {
        if file_len >= 8 && {
            let mut head = [0u8; 8];
            std::io::Read::read_exact(&mut &file, &mut head).is_ok() && head != MAGIC
        } {
            return Err(BundleError::BadMagic { path: path.into() });
        }
        return Err(BundleError::Truncated {
            path: path.into(),
            expected: HEADER_LEN as u64,
            actual: file_len,
        });
    }
    // SAFETY: read-only map; like every mmap loader we rely on the file not being truncated
    // while the bundle is in use.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(path))?;
    decode_bundle(Bytes::from_owner(map), path, registry, options)
}

/// Decodes a bundle held in memory (`path` names it in errors), rebuilding and verifying its
/// graph. Every length and offset is checked against `bytes` before it is used.
pub fn decode_bundle(
    bytes: Bytes,
    path: &Path,
    registry: &OpRegistry,
    options: LoadOptions,
) -> Result<Bundle, BundleError> {
    let file_len = bytes.len() as u64;
    let corrupt = |msg: String| BundleError::Corrupt {
        path: path.to_path_buf(),
        msg,
    };
    if bytes.len() < HEADER_LEN {
        if bytes.len() >= 8 && bytes[..8] != MAGIC {
            return Err(BundleError::BadMagic { path: path.into() });
        }
        return Err(BundleError::Truncated {
            path: path.into(),
            expected: HEADER_LEN as u64,
            actual: file_len,
        });
    }
    let header = &bytes[..HEADER_LEN];
    if header[0..8] != MAGIC {
        return Err(BundleError::BadMagic { path: path.into() });
    }
    let version = read_u32(header, 8);
    if version != FORMAT_VERSION {
        return Err(BundleError::Version {
            path: path.into(),
            found: version,
        });
    }
    let manifest_offset = read_u64(header, 16);
    let manifest_len = read_u64(header, 24);
    let data_offset = read_u64(header, 32);
    let data_len = read_u64(header, 40);
    let stored_crc = read_u32(header, 48);
    let manifest_end = manifest_offset
        .checked_add(manifest_len)
        .ok_or_else(|| corrupt("manifest length overflows".into()))?;
    let data_end = data_offset
        .checked_add(data_len)
        .ok_or_else(|| corrupt("data length overflows".into()))?;
    if manifest_offset != HEADER_LEN as u64
        || data_offset < manifest_end
        || !data_offset.is_multiple_of(ALIGN as u64)
    {
        return Err(corrupt(format!(
            "inconsistent header (manifest at {manifest_offset}+{manifest_len}, data at {data_offset})"
        )));
    }
    if data_end > file_len {
        return Err(BundleError::Truncated {
            path: path.into(),
            expected: data_end,
            actual: file_len,
        });
    }
    if data_end < file_len {
        return Err(BundleError::TrailingBytes {
            path: path.into(),
            expected: data_end,
            actual: file_len,
        });
    }
    let manifest_bytes = bytes.slice(manifest_offset as usize..manifest_end as usize);
    let data = bytes.slice(data_offset as usize..data_end as usize);
    if options.verify_checksum {
        let mut crc = crc32fast::Hasher::new();
        crc.update(&manifest_bytes);
        crc.update(&data);
        let computed = crc.finalize();
        if computed != stored_crc {
            return Err(BundleError::Checksum {
                path: path.into(),
                stored: stored_crc,
                computed,
            });
        }
    }
    let manifest = proto::Manifest::decode(manifest_bytes)
        .map_err(|e| corrupt(format!("manifest does not decode: {e}")))?;
    if manifest.format_version != FORMAT_VERSION {
        return Err(corrupt(format!(
            "manifest says format version {} but the header says {FORMAT_VERSION}",
            manifest.format_version
        )));
    }
    let contents = manifest::decode(manifest, &data, registry).map_err(|e| match e {
        manifest::DecodeError::Corrupt(msg) => corrupt(msg),
        manifest::DecodeError::Graph(source) => BundleError::Graph {
            path: path.into(),
            source,
        },
    })?;
    Ok(Bundle {
        path: path.into(),
        contents,
        file_len,
    })
}
