//! The data-unit grid of file format version 2, aligned to backing pages.
//!
//! Plaintext byte `p` lives at backing offset `32 + p` (after the 32-byte
//! file header). Unit 0 covers plaintext `[0, 4064)`, unit `i ≥ 1` covers
//! `[4096·i − 32, 4096·i + 4064)`: each unit fills exactly one 4096-byte
//! backing page, so a `pwrite` the kernel stops between pages (a fatal
//! signal) never leaves a unit half old, half new. The final unit is
//! whatever remains; a remainder of 1..15 bytes is merged into the unit
//! before it, the one unit that spans two pages.

/// Size of a backing page, and of every full data unit but the first.
pub const UNIT_SIZE: u64 = 4096;
/// Length of the header at the start of every non-empty backing file.
pub const FILE_HEADER_LEN: u64 = 32;
/// Files shorter than this are "tiny" and use the keystream scheme.
pub const TINY_LIMIT: u64 = 16;
/// Largest plaintext size: the backing length must fit in an `off_t`.
pub const MAX_SIZE: u64 = i64::MAX as u64 - FILE_HEADER_LEN;

/// Number of the unit holding plaintext byte `pos` on the full grid.
pub fn unit_index(pos: u64) -> u64 {
    (pos + FILE_HEADER_LEN) / UNIT_SIZE
}

/// Plaintext offset where unit `idx` starts.
pub fn unit_start(idx: u64) -> u64 {
    (idx * UNIT_SIZE).saturating_sub(FILE_HEADER_LEN)
}

/// Plaintext offset where a full unit `idx` ends.
fn nominal_end(idx: u64) -> u64 {
    (idx + 1) * UNIT_SIZE - FILE_HEADER_LEN
}

/// Start of the last data unit of a non-tiny file of `size` bytes.
pub fn last_unit_start(size: u64) -> u64 {
    debug_assert!(size >= TINY_LIMIT);
    let idx = unit_index(size - 1);
    let start = unit_start(idx);
    if size - start < TINY_LIMIT && idx > 0 {
        // Too short for XTS: merged into the unit before.
        unit_start(idx - 1)
    } else {
        start
    }
}

/// The data unit holding plaintext byte `pos` (`pos < size`) of a non-tiny
/// file of `size` bytes: `(start, end, index)`.
pub fn unit_bounds(size: u64, pos: u64) -> (u64, u64, u64) {
    let last = last_unit_start(size);
    let idx = unit_index(pos).min(unit_index(last));
    let start = unit_start(idx);
    let end = if start == last {
        size
    } else {
        nominal_end(idx)
    };
    (start, end, idx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_tile_the_file_and_fill_backing_pages() {
        for size in (16..3 * UNIT_SIZE + 40).chain([1 << 40, (1 << 40) + 7]) {
            // Large sizes: only the units near the end.
            let mut pos = if size > 1 << 20 {
                unit_start(unit_index(size - 3 * UNIT_SIZE))
            } else {
                0
            };
            let mut prev_idx = (pos > 0).then(|| unit_index(pos) - 1);
            let mut straddling = 0;
            while pos < size {
                let (s, e, idx) = unit_bounds(size, pos);
                assert_eq!(s, pos, "size {size}");
                assert!(e - s >= TINY_LIMIT, "size {size} unit {idx}");
                assert_eq!(prev_idx.map_or(0, |p| p + 1), idx);
                let (bs, be) = (s + FILE_HEADER_LEN, e + FILE_HEADER_LEN);
                if bs / UNIT_SIZE != (be - 1) / UNIT_SIZE {
                    // Only a merged final unit of 4065..4111 bytes.
                    straddling += 1;
                    assert_eq!(e, size);
                    assert!(size - unit_start(idx + 1) < TINY_LIMIT);
                } else {
                    assert!(e == size || be % UNIT_SIZE == 0, "size {size} unit {idx}");
                }
                prev_idx = Some(idx);
                pos = e;
            }
            assert!(straddling <= 1);
        }
    }
}
