//! Atomic file output.
//!
//! Every file the tools write goes first to a temporary file beside its target
//! (`.<name>.tmp<pid>`, same directory, so the final rename never crosses a file system),
//! is synced, and is renamed over the target only when complete. A failure, a dropped
//! [`AtomicFile`] or an interrupt handled with [`discard_in_flight`] leaves the target as it
//! was: never half-written, never clobbered.
//!
//! The target must be a regular file or absent: an existing directory, device, FIFO or
//! socket is refused rather than replaced by a regular file.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Temporary files being written now, removed by [`discard_in_flight`].
static IN_FLIGHT: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn in_flight() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner())
}

/// The directory a target lives in (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// The temporary file [`AtomicFile::create`] uses for `path` in this process.
pub fn temp_path(path: &Path) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"))?;
    Ok(parent_dir(path).join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

/// Checks, without writing anything, that `path` can be written atomically: its directory
/// exists, and the path is absent or a regular file. Call it before long work.
pub fn check_target(path: &Path) -> io::Result<()> {
    temp_path(path)?;
    let dir = parent_dir(path);
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("`{}` is not a directory", dir.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("the directory `{}` does not exist", dir.display()),
            ))
        }
        Err(e) => return Err(e),
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        // A symbolic link is replaced by the new file, as `mv` would; its target is kept.
        Ok(m) if m.file_type().is_symlink() => Ok(()),
        Ok(m) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "it exists and is {}; not replacing it",
                if m.is_dir() {
                    "a directory"
                } else {
                    "not a regular file"
                }
            ),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// A file being written to a temporary path, moved over its target by [`AtomicFile::commit`].
/// Dropping it uncommitted removes the temporary file.
pub struct AtomicFile {
    target: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
}

impl AtomicFile {
    /// Creates the temporary file for `target` (see [`check_target`] for what is refused).
    pub fn create(target: &Path) -> io::Result<AtomicFile> {
        check_target(target)?;
        let tmp = temp_path(target)?;
        let file = File::create(&tmp)?;
        in_flight().push(tmp.clone());
        Ok(AtomicFile {
            target: target.to_path_buf(),
            tmp,
            file: Some(file),
        })
    }

    /// The temporary file, to write and seek in.
    pub fn file(&mut self) -> &mut File {
        self.file
            .as_mut()
            .expect("an uncommitted AtomicFile holds its file")
    }

    /// Syncs the temporary file and renames it over the target.
    pub fn commit(mut self) -> io::Result<()> {
        let file = self.file.take().expect("commit runs once");
        file.sync_all()?;
        drop(file);
        // Held across the rename, so that `discard_in_flight` either removes the temporary
        // before it or finds it committed.
        let mut list = in_flight();
        let Some(i) = list.iter().position(|p| p == &self.tmp) else {
            return Err(io::Error::new(
                io::ErrorKind::Interrupted,
                "the output was discarded before it was complete",
            ));
        };
        // The target may have been replaced since `create`: check again just before.
        check_target(&self.target)?;
        std::fs::rename(&self.tmp, &self.target)?;
        list.swap_remove(i);
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        let mut list = in_flight();
        if let Some(i) = list.iter().position(|p| p == &self.tmp) {
            list.swap_remove(i);
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes the concatenation of `parts` to `path` atomically.
pub fn write_atomically(path: &Path, parts: &[&[u8]]) -> io::Result<()> {
    let mut out = AtomicFile::create(path)?;
    for p in parts {
        out.file().write_all(p)?;
    }
    out.commit()
}

/// Removes every temporary file this process is writing now, and returns how many. For a
/// signal handler that is about to exit: the targets keep their previous contents (or stay
/// absent), and a later [`AtomicFile::commit`] fails.
pub fn discard_in_flight() -> usize {
    let mut list = in_flight();
    let n = list.len();
    for tmp in list.drain(..) {
        let _ = std::fs::remove_file(tmp);
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_replaces_the_target_and_drop_leaves_it() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");
        std::fs::write(&target, b"old").unwrap();
        {
            let mut f = AtomicFile::create(&target).unwrap();
            f.file().write_all(b"half").unwrap();
            // Dropped uncommitted: the old contents stay and no temporary is left.
        }
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        write_atomically(&target, &[b"ne", b"w"]).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn refuses_directories_and_missing_parents() {
        let dir = tempfile::tempdir().unwrap();
        let e = check_target(dir.path()).unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
        let e = check_target(&dir.path().join("missing/out.patch")).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        assert!(check_target(&dir.path().join("fresh.patch")).is_ok());
    }

    #[cfg(unix)]
    #[test]
    fn refuses_to_replace_a_fifo() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        let status = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(
            status.unwrap().success(),
            "mkfifo (coreutils) makes the FIFO"
        );
        let e = write_atomically(&fifo, &[b"x"]).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        use std::os::unix::fs::FileTypeExt;
        assert!(std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo());
    }
}
