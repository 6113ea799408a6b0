//! The masking transform of RFC 6455 §5.3.
//!
//! Masking is XOR with a repeating 4-byte key. It runs over every byte a client
//! sends, so it works a machine word at a time; the compiler turns the 8-byte
//! loop into SIMD without any `unsafe` here.

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

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(buf: &mut [u8], mask: [u8; 4], offset: usize) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b ^= mask[(offset + i) % 4];
        }
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
