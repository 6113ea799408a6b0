//! The masking transform of RFC 6455 §5.3.
//!
//! Masking is XOR with a repeating 4-byte key. It runs over every byte a client
//! sends, so it works a machine word at a time; the compiler turns the 8-byte
//! loop into SIMD without any `unsafe` here.
//!
//! Client masking keys come from the operating system's cryptographic random
//! source, as §5.3 requires ("derived from a strong source of entropy"), so an
//! attacker cannot predict them and steer the masked bytes an intermediary sees.

/// XORs `buf` with `mask`, as if `buf` started `offset` bytes into the payload.
///
/// The offset lets a frame be unmasked in pieces as its bytes arrive.
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    let mut key = [0u8; 4];
    for (i, k) in key.iter_mut().enumerate() {
        *k = mask[(offset + i) % 4];
    }
    let word = u32::from_ne_bytes(key) as u64;
    let key64 = word | (word << 32);
    let key64 = key64.to_ne_bytes();
    let key64 = u64::from_ne_bytes(key64);

    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let bytes: [u8; 8] = (&*chunk).try_into().expect("chunks_exact yields 8 bytes");
        chunk.copy_from_slice(&(u64::from_ne_bytes(bytes) ^ key64).to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= key[i % 4];
    }
}

/// Keys drawn from the OS per refill: one `getrandom` call serves this many frames.
const KEYS_PER_REFILL: usize = 64;

/// A masking key for the next client frame, from the OS's cryptographic random
/// source (through a per-thread buffer, so that sending is not a system call
/// per frame).
///
/// # Panics
///
/// If the operating system has no random source to offer, which on the
/// platforms Switchboard runs on does not happen once the system has booted.
pub fn random_key() -> [u8; 4] {
    use std::cell::RefCell;
    thread_local! {
        static POOL: RefCell<([u8; 4 * KEYS_PER_REFILL], usize)> =
            const { RefCell::new(([0; 4 * KEYS_PER_REFILL], 4 * KEYS_PER_REFILL)) };
    }
    POOL.with(|pool| {
        let (bytes, used) = &mut *pool.borrow_mut();
        if *used == bytes.len() {
            getrandom::fill(bytes).expect("the OS random source is available");
            *used = 0;
        }
        let key = bytes[*used..*used + 4].try_into().expect("4 bytes");
        // Each key is handed out once.
        bytes[*used..*used + 4].fill(0);
        *used += 4;
        key
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(buf: &mut [u8], mask: [u8; 4], offset: usize) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b ^= mask[(offset + i) % 4];
        }
    }

    #[test]
    fn random_keys_do_not_repeat_across_refills() {
        let keys: std::collections::HashSet<[u8; 4]> =
            (0..4 * KEYS_PER_REFILL).map(|_| random_key()).collect();
        // 256 draws from 2^32: a repeat has odds of about one in 130,000; a
        // counter, a constant or a buffer that is never refilled would repeat.
        assert!(keys.len() >= 4 * KEYS_PER_REFILL - 1, "{}", keys.len());
    }

    #[test]
    fn matches_bytewise_masking_for_every_length_and_offset() {
        let mask = [0x12, 0x34, 0x56, 0x78];
        for len in 0..40 {
            for offset in 0..4 {
                let data: Vec<u8> = (0..len as u8).collect();
                let mut fast = data.clone();
                let mut slow = data.clone();
                apply_mask(&mut fast, mask, offset);
                naive(&mut slow, mask, offset);
                assert_eq!(fast, slow, "len {len} offset {offset}");
            }
        }
    }

    #[test]
    fn masking_in_pieces_equals_masking_at_once() {
        let mask = [1, 2, 3, 4];
        let data: Vec<u8> = (0..100).collect();
        let mut whole = data.clone();
        apply_mask(&mut whole, mask, 0);
        let mut pieces = data;
        let (a, b) = pieces.split_at_mut(7);
        apply_mask(a, mask, 0);
        apply_mask(b, mask, 7);
        assert_eq!(whole, pieces);
    }
}
