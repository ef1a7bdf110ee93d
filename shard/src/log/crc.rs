//! CRC32C (Castagnoli), with the SSE4.2 `crc32` instruction when the CPU has it.

const CRC_POLY: u32 = 0x82F6_3B78;

const fn crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ CRC_POLY } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

static CRC_TABLE: [u32; 256] = crc_table();

/// Continues a CRC32C (reflected, init and xorout `0xFFFF_FFFF`) over `data`; start with 0.
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("sse4.2") {
            // SAFETY: the CPU supports SSE4.2 (checked just above).
            return unsafe { crc32c_sse42(crc, data) };
        }
    }
    crc32c_soft(crc, data)
}

fn crc32c_soft(crc: u32, data: &[u8]) -> u32 {
    let mut c = !crc;
    for &byte in data {
        c = CRC_TABLE[((c ^ byte as u32) & 0xFF) as usize] ^ (c >> 8);
    }
    !c
}

/// CRC32C with the SSE4.2 `crc32` instruction.
///
/// # Safety
/// The CPU must support SSE4.2; the only caller checks `is_x86_feature_detected!("sse4.2")`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
#[allow(unused_unsafe)]
unsafe fn crc32c_sse42(crc: u32, data: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u64, _mm_crc32_u8};
    let mut c = (!crc) as u64;
    let mut words = data.chunks_exact(8);
    for word in &mut words {
        let w = u64::from_le_bytes(word.try_into().expect("chunks_exact yields 8 bytes"));
        // SAFETY: this function is only entered when SSE4.2 is available.
        c = unsafe { _mm_crc32_u64(c, w) };
    }
    let mut c = c as u32;
    for &byte in words.remainder() {
        // SAFETY: as above.
        c = unsafe { _mm_crc32_u8(c, byte) };
    }
    !c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_answers_hardware_and_software_agree() {
        assert_eq!(crc32c_append(0, b"123456789"), 0xE306_9283);
        assert_eq!(crc32c_soft(0, b"123456789"), 0xE306_9283);
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let split = crc32c_append(crc32c_append(0, &data[..333]), &data[333..]);
        assert_eq!(split, crc32c_soft(0, &data));
    }
}
