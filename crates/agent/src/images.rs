//! Registered base images: read-only disk images (raw or qcow2) that VM disks are made from,
//! each VM getting its own qcow2 overlay on one. The agent keeps its own copy of each image,
//! named by its SHA-256, so no one can change a base under the overlays that depend on it,
//! and two hosts can tell they hold the same base (live migration moves only the overlay).
//!
//! ```text
//! STATE/images/ID.json            the record: id, format, hash, sizes, where it came from
//! STATE/images/blobs/SHA.FORMAT   the image itself, read-only (0444)
//! ```
//!
//! Crash safety: the blob is copied to a temporary name, fsynced and renamed before the record
//! is written (atomically), so a record always has its blob; a blob left without a record by a
//! crash, or by a delete that crashed half-way, is removed when the agent opens the directory.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use bexar_devices::block::qcow2::{open_chain, probe};
use bexar_devices::block::DiskFormat;
use bexar_util::fs::{io_err, sync_dir, write_atomic};
use bexar_util::sync::lock;

use super::spec::{now_ms, valid_id, FieldError};
use super::store::StoreError;

/// What a caller registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    /// Caller-chosen id (same rules as VM ids).
    pub id: String,
    /// The file to take (absolute path); the agent copies it.
    pub path: PathBuf,
    /// `raw` or `qcow2` (default: probed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
}

/// A registered image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// Its id.
    pub id: String,
    /// Its format.
    pub format: DiskFormat,
    /// SHA-256 of the file, hex.
    pub sha256: String,
    /// The disk size a guest sees, in bytes.
    pub virtual_size: u64,
    /// The file's size on the host, in bytes.
    pub file_size: u64,
    /// Where it was registered from.
    pub source: PathBuf,
    /// When it was registered (ms since the epoch).
    pub created_ms: u64,
}

/// Why an image operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A field is wrong (the file is missing, not an image, has a backing file...).
    #[error("{0}")]
    Invalid(#[from] FieldError),
    /// No such image.
    #[error("no image with id {0:?}")]
    NotFound(String),
    /// The id is registered with another file.
    #[error("image {0:?} already exists with a different source")]
    Exists(String),
    /// The state directory failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The registered images of an agent.
#[derive(Debug)]
pub struct Images {
    dir: PathBuf,
    recs: Mutex<BTreeMap<String, Image>>,
    /// Held for a whole registration (copy and hash): registrations run one at a time.
    registering: Mutex<()>,
}

fn store_err<'a>(
    what: &'static str,
    p: &'a Path,
) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |e| StoreError::Io(io_err(what, p)(e))
}

impl Images {
    /// Opens `STATE/images`, loading every record and removing blobs no record names.
    pub fn open(state: &Path) -> Result<Self, StoreError> {
        let dir = state.join("images");
        let blobs = dir.join("blobs");
        fs::create_dir_all(&blobs).map_err(store_err("create", &blobs))?;
        let mut recs = BTreeMap::new();
        for entry in fs::read_dir(&dir)
            .map_err(store_err("read", &dir))?
            .flatten()
        {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.contains(".tmp") {
                let _ = fs::remove_file(&path);
                continue;
            }
            let Some(id) = name.strip_suffix(".json") else {
                continue;
            };
            match fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Image>(&b).map_err(|e| e.to_string()))
            {
                Ok(img) if img.id == id => {
                    recs.insert(img.id.clone(), img);
                }
                Ok(_) => tracing::error!("{}: record of another image; skipped", path.display()),
                Err(e) => {
                    tracing::error!("{}: unreadable image record: {e}; skipped", path.display())
                }
            }
        }
        let this = Self {
            dir,
            recs: Mutex::new(recs),
            registering: Mutex::new(()),
        };
        let named: Vec<PathBuf> = lock(&this.recs).values().map(|i| this.blob(i)).collect();
        for entry in fs::read_dir(&blobs)
            .map_err(store_err("read", &blobs))?
            .flatten()
        {
            if !named.contains(&entry.path()) {
                tracing::warn!(
                    "{}: image file without a record; removing",
                    entry.path().display()
                );
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(this)
    }

    /// The file of `img`.
    pub fn blob(&self, img: &Image) -> PathBuf {
        self.dir
            .join("blobs")
            .join(format!("{}.{}", img.sha256, img.format.as_str()))
    }

    /// Every image, by id.
    pub fn list(&self) -> Vec<Image> {
        lock(&self.recs).values().cloned().collect()
    }

    /// One image.
    pub fn get(&self, id: &str) -> Result<Image, ImageError> {
        lock(&self.recs)
            .get(id)
            .cloned()
            .ok_or_else(|| ImageError::NotFound(id.to_owned()))
    }

    /// Bytes the image files take on the host.
    pub fn bytes(&self) -> u64 {
        lock(&self.recs).values().map(|i| i.file_size).sum()
    }

    /// Registers `spec`: checks the file is a usable, self-contained image, copies it in and
    /// hashes the copy. Returns the image and whether it is new (false: the same id was
    /// registered from the same file already). Blocking: copies and hashes the whole file.
    pub fn register(&self, spec: &ImageSpec) -> Result<(Image, bool), ImageError> {
        if !valid_id(&spec.id) {
            return Err(FieldError::new(
                "id",
                "must be 1-63 characters of a-z, 0-9, '-', '_' or '.', starting with a letter or digit",
            )
            .into());
        }
        if !spec.path.is_absolute() {
            return Err(FieldError::new("path", "must be an absolute path").into());
        }
        let _one = lock(&self.registering);
        if let Some(old) = lock(&self.recs).get(&spec.id) {
            return if old.source == spec.path && spec.format.is_none_or(|f| f == old.format) {
                Ok((old.clone(), false))
            } else {
                Err(ImageError::Exists(spec.id.clone()))
            };
        }
        let field = |m: String| ImageError::Invalid(FieldError::new("path", m));
        match fs::metadata(&spec.path) {
            Ok(m) if m.is_file() => {}
            Ok(_) => {
                return Err(field(format!(
                    "{} is not a regular file",
                    spec.path.display()
                )))
            }
            Err(e) => return Err(field(format!("{}: {e}", spec.path.display()))),
        }
        let format = match spec.format {
            Some(f) => f,
            None => probe(&spec.path).map_err(|e| field(e.to_string()))?,
        };
        let mut levels = Vec::new();
        let image = open_chain(&spec.path, format, false, false, &mut levels)
            .map_err(|e| field(e.to_string()))?;
        let virtual_size = image.size();
        drop(image);
        if levels.len() > 1 {
            return Err(field(format!(
                "{} has a backing file ({}): register a self-contained image (qemu-img convert -O qcow2 flattens a chain)",
                spec.path.display(),
                levels[1].path.display()
            )));
        }
        if virtual_size == 0 || virtual_size % 512 != 0 {
            return Err(field(format!(
                "{} bytes is not a disk size (a positive multiple of 512)",
                virtual_size
            )));
        }

        // Copy (the kernel's copy_file_range, a reflink where the file system has them),
        // then hash the copy: the hash is of what the agent keeps.
        let tmp = self
            .dir
            .join("blobs")
            .join(format!(".tmp.{}.{}", spec.id, std::process::id()));
        let copy = || -> Result<(String, u64), StoreError> {
            fs::copy(&spec.path, &tmp).map_err(store_err("copy", &spec.path))?;
            let mut f = fs::File::open(&tmp).map_err(store_err("open", &tmp))?;
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut n = 0u64;
            loop {
                let k = f.read(&mut buf).map_err(store_err("read", &tmp))?;
                if k == 0 {
                    break;
                }
                h.update(&buf[..k]);
                n += k as u64;
            }
            f.sync_all().map_err(store_err("fsync", &tmp))?;
            let hex = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
            Ok((hex, n))
        };
        let (sha256, file_size) = match copy() {
            Ok(x) => x,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e.into());
            }
        };
        let img = Image {
            id: spec.id.clone(),
            format,
            sha256,
            virtual_size,
            file_size,
            source: spec.path.clone(),
            created_ms: now_ms(),
        };
        let blob = self.blob(&img);
        let placed = (|| -> Result<(), StoreError> {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o444))
                .map_err(store_err("chmod", &tmp))?;
            // The same content registered under another id: one file serves both.
            if blob.exists() {
                let _ = fs::remove_file(&tmp);
            } else {
                fs::rename(&tmp, &blob).map_err(store_err("rename", &tmp))?;
            }
            sync_dir(&self.dir.join("blobs"))?;
            write_atomic(
                &self.dir.join(format!("{}.json", img.id)),
                &serde_json::to_vec_pretty(&img)?,
            )?;
            Ok(())
        })();
        if let Err(e) = placed {
            let _ = fs::remove_file(&tmp);
            return Err(e.into());
        }
        lock(&self.recs).insert(img.id.clone(), img.clone());
        Ok((img, true))
    }

    /// Removes image `id`: its record, then its file unless another image has the same
    /// content. The caller checks no VM uses it.
    pub fn remove(&self, id: &str) -> Result<Image, ImageError> {
        let _one = lock(&self.registering);
        let img = self.get(id)?;
        let rec = self.dir.join(format!("{id}.json"));
        fs::remove_file(&rec).map_err(store_err("remove", &rec))?;
        sync_dir(&self.dir).map_err(StoreError::Io)?;
        let mut recs = lock(&self.recs);
        recs.remove(id);
        if !recs
            .values()
            .any(|i| i.sha256 == img.sha256 && i.format == img.format)
        {
            let _ = fs::remove_file(self.blob(&img));
        }
        Ok(img)
    }
}
