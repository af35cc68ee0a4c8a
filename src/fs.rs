//! Files the crate writes, whole or not at all.
//!
//! A file, or a directory of files, is written under a temporary name unique to the call
//! (process, thread, counter) beside its target, synced to the disk, and renamed over the
//! target in one step; then the directory holding it is synced. A crash, a kill or a power
//! cut leaves the previous version or the new one, never half of one or a mix of two, and a
//! reader sees one or the other. Temporaries a killed writer left behind are removed by the
//! next save to the same place.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// What marks a temporary of the crate's: `.{target}.kiln-tmp.{pid}.{thread}.{n}`.
const TEMP_TAG: &str = ".kiln-tmp.";

/// A name beside `target` that no other call, thread or process uses.
fn temp_beside(target: &Path) -> io::Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = target.file_name().ok_or_else(|| io::Error::other(format!("{} has no file name", target.display())))?;
    let thread = format!("{:?}", std::thread::current().id()).chars().filter(char::is_ascii_digit).collect::<String>();
    let mut tmp = OsString::from(".");
    tmp.push(name);
    tmp.push(format!("{TEMP_TAG}{}.{thread}.{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
    Ok(target.with_file_name(tmp))
}

/// The directory holding `target`, created if needed.
fn parent_of(target: &Path) -> io::Result<PathBuf> {
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Writes `bytes` to `path` atomically (see the module docs).
pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = parent_of(path)?;
    remove_leftovers(&dir, path);
    let tmp = temp_beside(path)?;
    let written = (|| {
        let mut file = File::create_new(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    sync_dir(&dir)
}

/// [`write_file`] with the bytes streamed by `fill`, so a large file need not be held whole
/// in memory.
pub(crate) fn write_file_with(path: &Path, fill: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> io::Result<()> {
    let dir = parent_of(path)?;
    remove_leftovers(&dir, path);
    let tmp = temp_beside(path)?;
    let written = (|| {
        let file = File::create_new(&tmp)?;
        let mut buffered = io::BufWriter::with_capacity(1 << 20, file);
        fill(&mut buffered)?;
        let file = buffered.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    sync_dir(&dir)
}

/// Writes the directory `path` holding exactly `files` (name, bytes) atomically as a whole:
/// the previous version, if any, stays in place until the new one is complete on the disk,
/// then the two are swapped in one step.
pub(crate) fn write_dir(path: &Path, files: &[(&str, &[u8])]) -> io::Result<()> {
    let dir = parent_of(path)?;
    remove_leftovers(&dir, path);
    let tmp = temp_beside(path)?;
    let written = (|| {
        fs::create_dir(&tmp)?;
        for (name, bytes) in files {
            let mut file = File::create_new(tmp.join(name))?;
            file.write_all(bytes)?;
            file.sync_all()?;
        }
        sync_dir(&tmp)?;
        swap_in(&tmp, path)
    })();
    // `tmp` now holds the previous version (or the unfinished new one): drop it.
    let _ = fs::remove_dir_all(&tmp);
    written?;
    sync_dir(&dir)
}

/// Reads the files `names` of the directory `path`, all from one version of it: the
/// directory is opened once and each file is opened relative to it (`openat`), so a swap by
/// [`write_dir`] in the middle cannot give one file of each version. A version removed
/// while it is read (its writer replaced it) is read again from the new one.
pub(crate) fn read_dir_files(path: &Path, names: &[&str]) -> io::Result<Vec<Vec<u8>>> {
    let mut tries = 0;
    loop {
        match read_one_version(path, names) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && tries < 16 && path.is_dir() => tries += 1,
            other => return other,
        }
    }
}

#[cfg(target_os = "linux")]
fn read_one_version(path: &Path, names: &[&str]) -> io::Result<Vec<Vec<u8>>> {
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::fs::OpenOptionsExt;
    let dir = fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECTORY).open(path)?;
    names
        .iter()
        .map(|name| {
            let c_name = std::ffi::CString::new(*name).map_err(io::Error::other)?;
            // SAFETY: a valid directory descriptor and a NUL-terminated relative name.
            let fd = unsafe { libc::openat(dir.as_raw_fd(), c_name.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
            if fd < 0 {
                let e = io::Error::last_os_error();
                return Err(io::Error::new(e.kind(), format!("{}: {e}", path.join(name).display())));
            }
            // SAFETY: `fd` was just opened and is owned by nothing else.
            let mut file = unsafe { File::from_raw_fd(fd) };
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes)?;
            Ok(bytes)
        })
        .collect()
}

/// Without `openat`: read every file, then the first again; a change means a swap came in
/// between, so read again.
#[cfg(not(target_os = "linux"))]
fn read_one_version(path: &Path, names: &[&str]) -> io::Result<Vec<Vec<u8>>> {
    for _ in 0..16 {
        let files = names.iter().map(|n| fs::read(path.join(n))).collect::<io::Result<Vec<_>>>()?;
        if names.first().is_none_or(|n| fs::read(path.join(n)).ok().as_ref() == files.first()) {
            return Ok(files);
        }
    }
    Err(io::Error::other(format!("{} kept changing while it was read", path.display())))
}

/// Puts the complete directory `new` at `target`, keeping whatever was there until then.
fn swap_in(new: &Path, target: &Path) -> io::Result<()> {
    match fs::symlink_metadata(target) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => match fs::rename(new, target) {
            Ok(()) => return Ok(()),
            // Another writer put a version there meanwhile: swap with it.
            Err(_) if target.is_dir() => {}
            Err(e) => return Err(e),
        },
        Err(e) => return Err(e),
        Ok(m) if !m.is_dir() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a directory", target.display()),
            ));
        }
        Ok(_) => {}
    }
    exchange(new, target)
}

/// Swaps two directories in one step (Linux's `renameat2(RENAME_EXCHANGE)`); where the file
/// system or the system lacks it, moves the old one aside first, so a crash between the two
/// renames leaves both versions on disk, never a mix.
fn exchange(new: &Path, target: &Path) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other);
        let (a, b) = (c(new)?, c(target)?);
        // SAFETY: two valid NUL-terminated paths, relative to the working directory.
        let r =
            unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_EXCHANGE) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) {
            return Err(e);
        }
    }
    let old = temp_beside(target)?;
    fs::rename(target, &old)?;
    if let Err(e) = fs::rename(new, target) {
        let _ = fs::rename(&old, target);
        return Err(e);
    }
    // Hand the old version back under `new`, which the caller removes.
    fs::rename(&old, new)
}

/// Flushes a directory's entries (a rename into it) to the disk.
fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Removes the temporaries that writers to `target` left behind when they were killed: those
/// of processes no longer running (a live process's own, another thread's included, are in
/// use).
fn remove_leftovers(dir: &Path, target: &Path) {
    let Some(name) = target.file_name() else { return };
    let mut prefix = OsString::from(".");
    prefix.push(name);
    prefix.push(TEMP_TAG);
    let prefix = prefix.to_string_lossy().into_owned();
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = file_name.strip_prefix(&prefix) else { continue };
        let Some(pid) = rest.split('.').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid == std::process::id() || process_alive(pid) {
            continue;
        }
        let path = entry.path();
        let _ = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
    }
}

/// Whether process `pid` is running; unknown counts as running, so nothing in use is removed.
fn process_alive(pid: u32) -> bool {
    #[cfg(target_os = "linux")]
    {
        Path::new("/proc").join(pid.to_string()).exists()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = pid;
        true
    }
}
