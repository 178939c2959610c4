//! What `kmsfs mount` verifies before it serves anything.
//!
//! The header MAC only proves that the header was written by someone who
//! knew the master key the header itself carries. Anyone allowed to call
//! Transit *encrypt* with the same key, and to write the backing directory,
//! can therefore put in a header of their own (the victim's UUID, a master
//! key of their choice, a valid MAC). Three checks catch that:
//!
//! 1. [`Expected::load`], before the KMS is asked: the header's UUID must
//!    be the one this host registered for the directory at `create`
//!    (catches another filesystem's header copied over this one's);
//! 2. [`Expected::check_key`], after unlocking: the unwrapped key's check
//!    value must equal the one recorded in the registry at `create` and the
//!    one given with `-o kcv=` (catches any other master key);
//! 3. [`check_root_names`]: every entry of the root directory must decrypt
//!    under the unwrapped key and `kmsfs.diriv` (catches a foreign key or a
//!    changed root IV on hosts that recorded nothing, as long as the root
//!    holds entries).

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context as _};
use kmsfs_core::keys::FsKeys;
use kmsfs_core::layout::{self, DIR_IV_NAME};
use kmsfs_core::names::{classify, decrypt_name, BackingEntry};

use crate::commands::uuid_string;
use crate::keycheck::KeyCheck;
use crate::registry::{Entry, Registry};

/// How many failing names an error lists.
const NAMES_SHOWN: usize = 3;

/// What this host expects of a filesystem before unlocking it.
#[derive(Debug, Clone)]
pub struct Expected {
    registry_file: PathBuf,
    registered: Option<Entry>,
    option: Option<KeyCheck>,
}

/// The outcome of [`Expected::check_key`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyVerdict {
    /// The key matched every recorded or given key check value.
    Pinned,
    /// Nothing was recorded or given: the key could not be checked. Holds
    /// the warning to show the operator, with the `-o kcv=` to pin.
    Unpinned(String),
}

impl Expected {
    /// Reads the registry `registry_file` (a missing one is empty) and
    /// checks the unverified header UUID of `cipherdir` (canonical) against
    /// the filesystem registered there. `option` is `-o kcv=`.
    ///
    /// A filesystem registered under another path (a moved directory) is
    /// found by its UUID.
    pub fn load(
        registry_file: &Path,
        cipherdir: &Path,
        header_uuid: &[u8; 16],
        option: Option<KeyCheck>,
    ) -> anyhow::Result<Self> {
        let reg = Registry::load(registry_file)?;
        let id = uuid_string(header_uuid);
        let registered =
            match reg.by_path(cipherdir) {
                Some(e) if !e.uuid.eq_ignore_ascii_case(&id) => bail!(
                "{}: this header belongs to filesystem {id}, but this host created filesystem {} \
                 in {} (see {}): kmsfs.header was replaced, for instance by another \
                 filesystem's header. Refusing to mount; restore this directory's own \
                 kmsfs.header from a backup (or, if the directory was replaced on purpose, remove \
                 its entry from {})",
                cipherdir.join(kmsfs_core::header::HEADER_FILE_NAME).display(),
                e.uuid,
                cipherdir.display(),
                registry_file.display(),
                registry_file.display()
            ),
                Some(e) => Some(e.clone()),
                None => reg.by_uuid(&id).cloned(),
            };
        Ok(Expected {
            registry_file: registry_file.to_path_buf(),
            registered,
            option,
        })
    }

    /// Checks the key check value of the unlocked `keys` of `cipherdir`
    /// against `-o kcv=` and the registry.
    pub fn check_key(&self, cipherdir: &Path, keys: &FsKeys) -> anyhow::Result<KeyVerdict> {
        let actual = KeyCheck::of(keys);
        let recorded = self.registered.as_ref().and_then(|e| e.kcv);
        let sources = [
            self.option
                .map(|k| (k, "the mount option kcv=".to_string())),
            recorded.map(|k| {
                (
                    k,
                    format!("{} (recorded at create)", self.registry_file.display()),
                )
            }),
        ];
        let mut pinned = false;
        for (expected, source) in sources.into_iter().flatten() {
            if expected != actual {
                bail!(
                    "{}: the master key in kmsfs.header has key check value {actual}, but {source} \
                     says {expected}: kmsfs.header was replaced or forged (a header wrapped by the \
                     same KMS key with another master key unlocks, but is not this filesystem's). \
                     Refusing to mount; restore kmsfs.header from a backup, and compare the value \
                     with `kmsfs info` on the host that created the filesystem",
                    cipherdir.display()
                );
            }
            pinned = true;
        }
        if pinned {
            return Ok(KeyVerdict::Pinned);
        }
        Ok(KeyVerdict::Unpinned(format!(
            "{}: no key check value is recorded for this filesystem on this host, so a replaced \
             kmsfs.header is only caught when the root directory's names do not decrypt. Its key \
             is {actual}: if `kmsfs create` printed that value (`kmsfs info` on the creating host \
             shows it), mount with -o kcv={actual} (in fstab too) to refuse any other key",
            cipherdir.display()
        )))
    }
}

/// Checks that every entry of the root backing directory `cipherdir`
/// decrypts under `keys` and the root directory IV; returns how many
/// entries were checked.
///
/// `kmsfs.diriv` is opened without following symlinks or blocking on a
/// FIFO and must be a regular file of exactly 16 bytes.
pub fn check_root_names(cipherdir: &Path, keys: &FsKeys) -> anyhow::Result<usize> {
    let dir = File::options()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(cipherdir)
        .with_context(|| format!("cannot open the backing directory {}", cipherdir.display()))?;
    let iv_path = cipherdir.join(DIR_IV_NAME);
    let iv = layout::read_dir_iv(dir.as_fd()).map_err(|e| {
        anyhow!(
            "{}: {e}; the root directory IV is missing or damaged, so no name in {} can be \
             decrypted. Restore it from a backup of the backing directory",
            iv_path.display(),
            cipherdir.display()
        )
    })?;
    let mut total = 0usize;
    let mut bad: Vec<String> = Vec::new();
    let entries = std::fs::read_dir(cipherdir)
        .with_context(|| format!("cannot list {}", cipherdir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", cipherdir.display()))?;
        let os_name = entry.file_name();
        let Some(name) = os_name.to_str() else {
            total += 1;
            bad.push(format!(
                "'{}' (not a kmsfs name)",
                os_name.to_string_lossy()
            ));
            continue;
        };
        let full = match classify(name) {
            BackingEntry::Internal => continue,
            BackingEntry::Encoded(s) => Ok(s.to_string()),
            BackingEntry::LongName(h) => {
                layout::read_sidecar(dir.as_fd(), h).map_err(|e| format!("sidecar: {e}"))
            }
        };
        total += 1;
        let decrypted = full.and_then(|f| {
            decrypt_name(keys, &iv, &f)
                .map(drop)
                .map_err(|e| e.to_string())
        });
        if let Err(why) = decrypted {
            bad.push(format!("'{name}' ({why})"));
        }
    }
    if bad.is_empty() {
        return Ok(total);
    }
    let shown = bad
        .iter()
        .take(NAMES_SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    let more = if bad.len() > NAMES_SHOWN { ", ..." } else { "" };
    if bad.len() == total {
        bail!(
            "{}: none of the {total} entries in the root directory decrypt with the key \
             kmsfs.header unwraps to ({shown}{more}): kmsfs.header or kmsfs.diriv is not the one \
             these files were written with (replaced, forged, or copied from another \
             filesystem). Refusing to mount rather than show an empty tree; restore both from a \
             backup of the backing directory",
            cipherdir.display()
        );
    }
    bail!(
        "{}: {} of the {total} entries in the root directory do not decrypt with this \
         filesystem's key ({shown}{more}): they were altered or planted in the backing \
         directory. Refusing to mount; move them out of {} (or restore them from a backup) and \
         mount again",
        cipherdir.display(),
        bad.len(),
        cipherdir.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use kmsfs_core::keys::MasterKey;
    use kmsfs_core::names::{encrypt_name, EncryptedName};

    const UUID: [u8; 16] = [7; 16];

    fn keys() -> FsKeys {
        FsKeys::derive(&MasterKey::generate().expect("key"), &UUID)
    }

    /// A backing directory with a root IV and entries for `names`.
    fn backing(keys: &FsKeys, names: &[&str]) -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        let h = File::open(d.path()).expect("open");
        let iv = layout::create_dir_iv(h.as_fd()).expect("iv");
        std::fs::write(d.path().join("kmsfs.header"), b"not checked here").expect("header");
        for n in names {
            let enc = encrypt_name(keys, &iv, n.as_bytes()).expect("encrypt");
            layout::write_sidecar(h.as_fd(), &enc).expect("sidecar");
            std::fs::write(d.path().join(enc.backing_name()), b"").expect("entry");
        }
        d
    }

    fn err(r: anyhow::Result<usize>) -> String {
        format!("{:#}", r.expect_err("must be refused"))
    }

    #[test]
    fn names_that_decrypt_pass_including_long_ones() {
        let k = keys();
        let long = "L".repeat(200);
        let d = backing(&k, &["a", "b", &long]);
        assert_eq!(check_root_names(d.path(), &k).expect("ok"), 3);
        let empty = backing(&k, &[]);
        assert_eq!(check_root_names(empty.path(), &keys()).expect("empty"), 0);
    }

    #[test]
    fn another_key_or_iv_is_refused() {
        let k = keys();
        let d = backing(&k, &["a", "b"]);
        let e = err(check_root_names(d.path(), &keys()));
        assert!(
            e.contains("none of the 2 entries") && e.contains("kmsfs.diriv"),
            "{e}"
        );
        let iv = d.path().join(DIR_IV_NAME);
        std::fs::remove_file(&iv).expect("rm");
        std::fs::write(&iv, [9u8; 16]).expect("iv");
        let e = err(check_root_names(d.path(), &k));
        assert!(e.contains("none of the 2 entries"), "{e}");
    }

    #[test]
    fn planted_entries_and_missing_sidecars_are_named() {
        let k = keys();
        let long = "L".repeat(200);
        let d = backing(&k, &["a", &long]);
        std::fs::write(d.path().join("lost+found"), b"").expect("plant");
        let e = err(check_root_names(d.path(), &k));
        assert!(
            e.contains("1 of the 3 entries") && e.contains("'lost+found'"),
            "{e}"
        );
        std::fs::remove_file(d.path().join("lost+found")).expect("rm");
        let EncryptedName::Long { hashed, .. } = encrypt_name(
            &k,
            &layout::read_dir_iv(File::open(d.path()).expect("o").as_fd()).expect("iv"),
            long.as_bytes(),
        )
        .expect("enc") else {
            panic!("expected a long name");
        };
        std::fs::remove_file(d.path().join(layout::sidecar_name(&hashed))).expect("rm");
        let e = err(check_root_names(d.path(), &k));
        assert!(
            e.contains("1 of the 2 entries") && e.contains("sidecar"),
            "{e}"
        );
    }

    #[test]
    fn a_bad_root_iv_is_refused_without_following_it() {
        let k = keys();
        let d = backing(&k, &["a"]);
        let iv = d.path().join(DIR_IV_NAME);
        std::fs::remove_file(&iv).expect("rm");
        let e = err(check_root_names(d.path(), &k));
        assert!(e.contains("kmsfs.diriv") && e.contains("Restore"), "{e}");
        std::fs::write(d.path().join("elsewhere"), [0u8; 16]).expect("w");
        std::os::unix::fs::symlink("elsewhere", &iv).expect("symlink");
        let e = err(check_root_names(d.path(), &k));
        assert!(e.contains("symbolic link"), "{e}");
    }

    fn registry_with(dir: &Path, entry: Entry) -> PathBuf {
        let p = dir.join("registry.toml");
        let mut r = Registry::default();
        r.add(entry);
        r.save(&p).expect("save");
        p
    }

    #[test]
    fn registered_uuid_must_match_the_header() {
        let d = tempfile::tempdir().expect("tempdir");
        let reg = registry_with(
            d.path(),
            Entry {
                path: "/srv/a".into(),
                uuid: uuid_string(&[1; 16]),
                kcv: None,
            },
        );
        let e =
            Expected::load(&reg, Path::new("/srv/a"), &[2; 16], None).expect_err("swapped header");
        let e = format!("{e:#}");
        assert!(
            e.contains("/srv/a/kmsfs.header") && e.contains("another filesystem's header"),
            "{e}"
        );
        Expected::load(&reg, Path::new("/srv/a"), &[1; 16], None).expect("same uuid");
        Expected::load(&reg, Path::new("/srv/b"), &[2; 16], None).expect("not registered");
    }

    #[test]
    fn key_check_values_are_enforced_from_option_and_registry() {
        let d = tempfile::tempdir().expect("tempdir");
        let k = keys();
        let good = KeyCheck::of(&k);
        let wrong = KeyCheck::of(&keys());
        let dir = Path::new("/srv/a");
        let missing = d.path().join("none.toml");
        let unpinned = Expected::load(&missing, dir, &UUID, None).expect("load");
        match unpinned.check_key(dir, &k).expect("unpinned") {
            KeyVerdict::Unpinned(w) => assert!(w.contains(&format!("-o kcv={good}")), "{w}"),
            v => panic!("{v:?}"),
        }
        let by_option = Expected::load(&missing, dir, &UUID, Some(good)).expect("load");
        assert_eq!(
            by_option.check_key(dir, &k).expect("match"),
            KeyVerdict::Pinned
        );
        let e = Expected::load(&missing, dir, &UUID, Some(wrong))
            .expect("load")
            .check_key(dir, &k)
            .expect_err("mismatch");
        assert!(format!("{e}").contains("kcv="), "{e}");

        // Recorded at create, found by path or (moved) by UUID.
        let reg = registry_with(
            d.path(),
            Entry {
                path: "/old/place".into(),
                uuid: uuid_string(&UUID),
                kcv: Some(wrong),
            },
        );
        let e = Expected::load(&reg, dir, &UUID, None)
            .expect("load")
            .check_key(dir, &k)
            .expect_err("registry mismatch");
        assert!(format!("{e}").contains("registry.toml"), "{e}");
        // The option does not override a registry that disagrees.
        assert!(Expected::load(&reg, dir, &UUID, Some(good))
            .expect("load")
            .check_key(dir, &k)
            .is_err());
    }
}
