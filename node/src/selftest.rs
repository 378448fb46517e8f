//! The self-test every module passes before it may serve: classify known images and check the
//! answers.
//!
//! First a 32x32 PNG drawn here (a colour gradient, stored without compression): the answer must be
//! well formed (k classes, valid indices, probabilities in [0, 1] that sum to at most 1). Then, for
//! a module whose labels are ImageNet's (it has a "pelican" class), a real photo embedded in the
//! node (`assets/pelican.jpeg`, CC BY 2.0, see `assets/README.md`) must come out as "pelican": a
//! module with scrambled weights or a broken preprocessing passes the first check, not this one.

use isomesh_protos::GuestClassification;

const SIDE: u32 = 32;

/// The known image, built once.
pub static IMAGE: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(gradient_png);

/// A real photo and the label an ImageNet classifier must give it.
pub const PHOTO: &[u8] = include_bytes!("../assets/pelican.jpeg");
pub const PHOTO_LABEL: &str = "pelican";

/// Whether a module with these labels must recognise [`PHOTO`].
pub fn knows_photo(labels: &[String]) -> bool {
    labels.iter().any(|l| l == PHOTO_LABEL)
}

/// Checks the answer to [`PHOTO`]: its top-1 must be [`PHOTO_LABEL`].
pub fn check_photo(answer: &GuestClassification, labels: &[String]) -> Result<(), String> {
    let top = answer.top.first().ok_or("no class for the known photo")?;
    let label = labels
        .get(top.index as usize)
        .map(String::as_str)
        .unwrap_or("?");
    if label == PHOTO_LABEL {
        Ok(())
    } else {
        Err(format!(
            "the known photo of a {PHOTO_LABEL} came out as {label:?} (p={:.3})",
            top.prob
        ))
    }
}

/// Checks that `answer` is a well-formed top-5 over `label_count` classes.
pub fn check(answer: &GuestClassification, label_count: usize) -> Result<(), String> {
    if answer.top.len() != 5 {
        return Err(format!("asked for 5 classes, got {}", answer.top.len()));
    }
    let mut sum = 0.0f32;
    let mut previous = f32::INFINITY;
    for score in &answer.top {
        if score.index as usize >= label_count {
            return Err(format!(
                "class index {} is past the {label_count} labels",
                score.index
            ));
        }
        if !(0.0..=1.0).contains(&score.prob) || score.prob > previous {
            return Err(format!(
                "probabilities are not ranked values in [0, 1]: {:?}",
                answer.top
            ));
        }
        previous = score.prob;
        sum += score.prob;
    }
    if sum > 1.0 + 1e-3 {
        return Err(format!("top-5 probabilities sum to {sum} > 1"));
    }
    Ok(())
}

fn gradient_png() -> Vec<u8> {
    let mut raw = Vec::with_capacity(((SIDE * 3 + 1) * SIDE) as usize);
    for y in 0..SIDE {
        raw.push(0); // filter: none
        for x in 0..SIDE {
            raw.extend_from_slice(&[(x * 8) as u8, (y * 8) as u8, 128]);
        }
    }
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&SIDE.to_be_bytes());
    ihdr.extend_from_slice(&SIDE.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    push_chunk(&mut png, b"IHDR", &ihdr);
    push_chunk(&mut png, b"IDAT", &zlib_stored(&raw));
    push_chunk(&mut png, b"IEND", &[]);
    png
}

/// PNG chunk: length, type, data, CRC-32 of type and data.
pub fn push_chunk(png: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    png.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = png.len();
    png.extend_from_slice(kind);
    png.extend_from_slice(data);
    let crc = crc32(&png[start..]);
    png.extend_from_slice(&crc.to_be_bytes());
}

/// A zlib stream of one stored (uncompressed) deflate block; `data` must be under 64 KiB.
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let len = data.len() as u16;
    let mut out = vec![0x78, 0x01, 0x01];
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(!len).to_le_bytes());
    out.extend_from_slice(data);
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in data {
        a = (a + byte as u32) % 65521;
        b = (b + a) % 65521;
    }
    out.extend_from_slice(&((b << 16) | a).to_be_bytes());
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &byte in data {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;
    use isomesh_protos::GuestScore;

    #[test]
    fn gradient_is_a_png() {
        assert!(IMAGE.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert!(IMAGE.ends_with(&[0xae, 0x42, 0x60, 0x82])); // CRC of an empty IEND
    }

    #[test]
    fn malformed_answers_fail_the_check() {
        let score = |index, prob| GuestScore { index, prob };
        let good = GuestClassification {
            top: vec![
                score(1, 0.5),
                score(2, 0.2),
                score(3, 0.1),
                score(4, 0.1),
                score(5, 0.05),
            ],
            ..Default::default()
        };
        assert!(check(&good, 1000).is_ok());
        assert!(check(&good, 3).is_err(), "index past the labels");
        let unranked = GuestClassification {
            top: vec![
                score(1, 0.1),
                score(2, 0.2),
                score(3, 0.1),
                score(4, 0.1),
                score(5, 0.05),
            ],
            ..Default::default()
        };
        assert!(check(&unranked, 1000).is_err());
    }
}
