//! POSIX ACLs in their extended-attribute form (`system.posix_acl_access`,
//! `system.posix_acl_default`): the parts the daemon must do itself under
//! `FUSE_POSIX_ACL`, where the kernel checks permissions but leaves to the
//! filesystem keeping the mode and the ACL in step and inheriting default
//! ACLs.
//!
//! The format is Linux's: a little-endian `u32` version (2), then 8-byte
//! entries `(u16 tag, u16 perm, u32 id)`.

/// Name of the access ACL attribute.
pub const ACCESS: &[u8] = b"system.posix_acl_access";
/// Name of the default ACL attribute.
pub const DEFAULT: &[u8] = b"system.posix_acl_default";

const VERSION: u32 = 2;
const USER_OBJ: u16 = 0x01;
const GROUP_OBJ: u16 = 0x04;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;

/// One ACL entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    tag: u16,
    perm: u16,
    id: u32,
}

/// A parsed ACL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl(Vec<Entry>);

impl Acl {
    /// Parses the attribute form; `None` if it is not a well-formed ACL
    /// (the kernel checks what callers set; this guards the backing store).
    pub fn parse(bytes: &[u8]) -> Option<Acl> {
        let (head, rest) = bytes.split_first_chunk::<4>()?;
        if u32::from_le_bytes(*head) != VERSION || rest.len() % 8 != 0 {
            return None;
        }
        let entries: Vec<Entry> = rest
            .chunks_exact(8)
            .map(|c| Entry {
                tag: u16::from_le_bytes([c[0], c[1]]),
                perm: u16::from_le_bytes([c[2], c[3]]),
                id: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
            })
            .collect();
        let has = |t| entries.iter().any(|e| e.tag == t);
        if !(has(USER_OBJ) && has(GROUP_OBJ) && has(OTHER)) {
            return None;
        }
        Some(Acl(entries))
    }

    /// The attribute form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + 8 * self.0.len());
        out.extend_from_slice(&VERSION.to_le_bytes());
        for e in &self.0 {
            out.extend_from_slice(&e.tag.to_le_bytes());
            out.extend_from_slice(&e.perm.to_le_bytes());
            out.extend_from_slice(&e.id.to_le_bytes());
        }
        out
    }

    fn perm(&self, tag: u16) -> u32 {
        self.0
            .iter()
            .find(|e| e.tag == tag)
            .map_or(0, |e| u32::from(e.perm & 7))
    }

    /// The entry that stands for the group class in the mode: the mask if
    /// there is one, else the owning group.
    fn group_class(&self) -> u16 {
        if self.0.iter().any(|e| e.tag == MASK) {
            MASK
        } else {
            GROUP_OBJ
        }
    }

    /// The permission bits (`0o777`) this access ACL implies.
    pub fn mode_bits(&self) -> u32 {
        (self.perm(USER_OBJ) << 6) | (self.perm(self.group_class()) << 3) | self.perm(OTHER)
    }

    /// Whether the ACL says no more than the permission bits (owner, group,
    /// other only): then no attribute is stored, as on ext4.
    pub fn is_minimal(&self) -> bool {
        self.0.len() == 3
    }

    /// `chmod` of a file with this access ACL: owner, group class and other
    /// entries take the new permission bits (`posix_acl_chmod`).
    pub fn chmod(&mut self, mode: u32) {
        let class = self.group_class();
        for e in &mut self.0 {
            let bits = match e.tag {
                USER_OBJ => mode >> 6,
                OTHER => mode,
                t if t == class => mode >> 3,
                _ => continue,
            };
            e.perm = (bits & 7) as u16;
        }
    }

    /// A new entry's access ACL from its directory's default ACL and the
    /// mode asked for (`posix_acl_create_masq`): each class entry keeps
    /// only what the mode allows, and the mode keeps only what the ACL
    /// allows. Returns the ACL and the new permission bits; the umask does
    /// not apply when a default ACL does.
    pub fn inherit(&self, mode: u32) -> (Acl, u32) {
        let mut acl = self.clone();
        let class = acl.group_class();
        for e in &mut acl.0 {
            let allowed = match e.tag {
                USER_OBJ => mode >> 6,
                OTHER => mode,
                t if t == class => mode >> 3,
                _ => continue,
            };
            e.perm &= (allowed & 7) as u16;
        }
        let bits = acl.mode_bits();
        (acl, (mode & !0o777) | bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const USER: u16 = 0x02;

    fn acl(entries: &[(u16, u16, u32)]) -> Acl {
        Acl(entries
            .iter()
            .map(|&(tag, perm, id)| Entry { tag, perm, id })
            .collect())
    }

    #[test]
    fn parses_what_it_writes_and_refuses_junk() {
        let a = acl(&[
            (USER_OBJ, 7, u32::MAX),
            (USER, 5, 1000),
            (GROUP_OBJ, 5, u32::MAX),
            (MASK, 5, u32::MAX),
            (OTHER, 0, u32::MAX),
        ]);
        assert_eq!(Acl::parse(&a.to_bytes()), Some(a.clone()));
        assert_eq!(a.mode_bits(), 0o750);
        assert!(!a.is_minimal());
        assert_eq!(Acl::parse(&[]), None);
        assert_eq!(Acl::parse(&[2, 0, 0, 0, 1]), None);
        assert_eq!(Acl::parse(&[1, 0, 0, 0]), None, "wrong version");
        // No OTHER entry.
        let short = acl(&[(USER_OBJ, 7, 0), (GROUP_OBJ, 7, 0)]);
        assert_eq!(Acl::parse(&short.to_bytes()), None);
    }

    #[test]
    fn chmod_moves_the_mask_not_the_owning_group() {
        let mut a = acl(&[
            (USER_OBJ, 7, 0),
            (USER, 7, 1000),
            (GROUP_OBJ, 7, 0),
            (MASK, 7, 0),
            (OTHER, 7, 0),
        ]);
        a.chmod(0o640);
        assert_eq!(a.mode_bits(), 0o640);
        assert_eq!(a.perm(MASK), 4);
        assert_eq!(a.perm(GROUP_OBJ), 7, "the owning group entry is kept");
        assert_eq!(a.perm(USER), 7, "named entries are limited by the mask");
        let mut m = acl(&[(USER_OBJ, 7, 0), (GROUP_OBJ, 7, 0), (OTHER, 7, 0)]);
        m.chmod(0o604);
        assert_eq!(m.mode_bits(), 0o604);
        assert!(m.is_minimal());
    }

    #[test]
    fn inheritance_masks_with_the_mode_asked_for() {
        let def = acl(&[
            (USER_OBJ, 7, 0),
            (USER, 7, 1000),
            (GROUP_OBJ, 5, 0),
            (MASK, 7, 0),
            (OTHER, 5, 0),
        ]);
        // open(O_CREAT, 0666): no execute bits anywhere.
        let (a, mode) = def.inherit(libc::S_IFREG | 0o666);
        assert_eq!(mode, libc::S_IFREG | 0o664);
        assert_eq!(a.perm(MASK), 6);
        assert_eq!(a.perm(USER), 7, "named entry kept, limited by the mask");
        // mkdir(0777) keeps the default ACL's bits.
        let (_, mode) = def.inherit(0o777);
        assert_eq!(mode, 0o775);
    }
}
