//! Round-to-nearest-even float32 -> FP8 E4M3FN encoding (saturating at ±448), for synthetic
//! FP8 checkpoints and quantization tests.

use std::sync::OnceLock;

use moeserve_quant::fp8::e4m3_to_f32;

/// Positive finite E4M3 values in code order (codes 0x00..=0x7e are increasing).
fn positive_values() -> &'static [f32; 127] {
    static T: OnceLock<[f32; 127]> = OnceLock::new();
    T.get_or_init(|| std::array::from_fn(|i| e4m3_to_f32(i as u8)))
}

pub fn encode_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs();
    let t = positive_values();
    if a >= t[126] {
        return sign | 0x7e;
    }
    // first code whose value is >= a
    let hi = t.partition_point(|&v| v < a);
    if hi == 0 {
        return sign;
    }
    let lo = hi - 1;
    let (dl, dh) = (a - t[lo], t[hi] - a);
    let code = if dl < dh || (dl == dh && lo % 2 == 0) { lo } else { hi };
    sign | code as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_code_and_rounds_to_nearest() {
        for b in 0..=0x7eu8 {
            assert_eq!(encode_e4m3(e4m3_to_f32(b)), b);
            assert_eq!(encode_e4m3(-e4m3_to_f32(b)) & 0x7f, b);
        }
        assert_eq!(e4m3_to_f32(encode_e4m3(1.06)), 1.0); // spacing 0.125 near 1
        assert_eq!(e4m3_to_f32(encode_e4m3(1.07)), 1.125);
        assert_eq!(e4m3_to_f32(encode_e4m3(1.0625)), 1.0); // tie -> even mantissa
        assert_eq!(e4m3_to_f32(encode_e4m3(1000.0)), 448.0);
    }
}
