//! The self-test every module passes before it may serve: classify known images and check the
//! answers. The policy of what a module must show lives here, beside the other reasons a module
//! is refused; the sandbox only runs the calls it asks for.
//!
//! Every answer must be well formed (k classes, valid indices, probabilities in [0, 1] that sum
//! to at most 1). For a module whose labels are ImageNet's (it has a "pelican" class), a real
//! photo embedded in the node (`assets/pelican.jpeg`, CC BY 2.0, see `assets/README.md`) must
//! also come out as "pelican": a module with scrambled weights or a broken preprocessing gives
//! well-formed answers, not this one. A classifier of other classes (a user's own model) has no
//! photo here to recognise, so it is checked for shape and determinism only: a 32x32 PNG drawn
//! here (a colour gradient, stored without compression) must get the same answer twice;
//! [`run_saying`] says which checks ran.

use isomesh_protos::{GuestClassification, GuestInfo};
use std::time::{Duration, Instant};

const SIDE: u32 = 32;

/// The known image, built once.
pub static IMAGE: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(gradient_png);

/// A real photo and the label an ImageNet classifier must give it.
pub const PHOTO: &[u8] = include_bytes!("../assets/pelican.jpeg");
pub const PHOTO_LABEL: &str = "pelican";

/// A module's classify call: an encoded image and how many classes to return.
pub type Classify<'a> = dyn FnMut(&[u8], u32) -> Result<GuestClassification, String> + 'a;

/// Why a module failed its self-test.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SelfTestError {
    /// The classify call itself failed (a trap, the deadline, an error answer).
    #[error("{0}")]
    Call(String),
    #[error("asked for {wanted} classes, got {got}")]
    ClassCount { wanted: usize, got: usize },
    #[error("class index {index} is past the {labels} labels")]
    PastLabels { index: u32, labels: usize },
    #[error("probabilities are not ranked values in [0, 1]: {0}")]
    NotRanked(String),
    #[error("top-5 probabilities sum to {0} > 1")]
    SumAboveOne(f32),
    #[error("no class for the known photo")]
    NoClass,
    #[error("the same image got two answers: {first} then {second}")]
    NotDeterministic { first: String, second: String },
    #[error("the known photo of a {PHOTO_LABEL} came out as {label:?} (p={prob:.3})")]
    Misread { label: String, prob: f32 },
}

/// Which checks a self-test ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// Shape, and the known photo recognised: an ImageNet classifier.
    ShapeAndPhoto,
    /// Shape and determinism only: a classifier of other classes.
    ShapeAndDeterminism,
}

impl Checked {
    pub fn describe(self) -> &'static str {
        match self {
            Checked::ShapeAndPhoto => "answer shape, and a known photo recognised",
            Checked::ShapeAndDeterminism => {
                "answer shape and determinism only (no known photo for these classes)"
            }
        }
    }
}

/// Runs the self-test through `classify` on a freshly loaded module described by `info`: the
/// photo if the module's labels are ImageNet's, else the drawn image twice. Returns how long the
/// first classification took, the node's service-time estimate until it has run a job.
pub fn run(classify: &mut Classify<'_>, info: &GuestInfo) -> Result<Duration, SelfTestError> {
    run_saying(classify, info).map(|(service, _)| service)
}

/// [`run`], saying which checks ran.
pub fn run_saying(
    classify: &mut Classify<'_>,
    info: &GuestInfo,
) -> Result<(Duration, Checked), SelfTestError> {
    // One classification where one says enough: each is a whole inference (0.4-0.5 s measured
    // on a device held to a quarter core), and the self-test delays every rollout.
    if knows_photo(&info.labels) {
        let timed = Instant::now();
        let answer = classify(PHOTO, 5).map_err(SelfTestError::Call)?;
        let service = timed.elapsed();
        check(&answer, info.labels.len())?;
        check_photo(&answer, &info.labels)?;
        return Ok((service, Checked::ShapeAndPhoto));
    }
    let timed = Instant::now();
    let answer = classify(&IMAGE, 5).map_err(SelfTestError::Call)?;
    let service = timed.elapsed();
    check(&answer, info.labels.len())?;
    let again = classify(&IMAGE, 5).map_err(SelfTestError::Call)?;
    if again.top != answer.top {
        return Err(SelfTestError::NotDeterministic {
            first: format!("{:?}", answer.top),
            second: format!("{:?}", again.top),
        });
    }
    Ok((service, Checked::ShapeAndDeterminism))
}

/// Whether a module with these labels must recognise [`PHOTO`].
pub fn knows_photo(labels: &[String]) -> bool {
    labels.iter().any(|l| l == PHOTO_LABEL)
}

/// Checks the answer to [`PHOTO`]: its top-1 must be [`PHOTO_LABEL`].
pub fn check_photo(answer: &GuestClassification, labels: &[String]) -> Result<(), SelfTestError> {
    let top = answer.top.first().ok_or(SelfTestError::NoClass)?;
    let label = labels
        .get(top.index as usize)
        .map(String::as_str)
        .unwrap_or("?");
    if label == PHOTO_LABEL {
        Ok(())
    } else {
        Err(SelfTestError::Misread {
            label: label.to_string(),
            prob: top.prob,
        })
    }
}

/// Checks that `answer` is a well-formed top-5 over `label_count` classes (all of them, when
/// there are fewer than 5).
pub fn check(answer: &GuestClassification, label_count: usize) -> Result<(), SelfTestError> {
    let wanted = label_count.min(5);
    if answer.top.len() != wanted {
        return Err(SelfTestError::ClassCount {
            wanted,
            got: answer.top.len(),
        });
    }
    let mut sum = 0.0f32;
    let mut previous = f32::INFINITY;
    for score in &answer.top {
        if score.index as usize >= label_count {
            return Err(SelfTestError::PastLabels {
                index: score.index,
                labels: label_count,
            });
        }
        if !(0.0..=1.0).contains(&score.prob) || score.prob > previous {
            return Err(SelfTestError::NotRanked(format!("{:?}", answer.top)));
        }
        previous = score.prob;
        sum += score.prob;
    }
    if sum > 1.0 + 1e-3 {
        return Err(SelfTestError::SumAboveOne(sum));
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
fn push_chunk(png: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    png.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let mut crc = flate2::Crc::new();
    crc.update(kind);
    crc.update(data);
    png.extend_from_slice(kind);
    png.extend_from_slice(data);
    png.extend_from_slice(&crc.sum().to_be_bytes());
}

/// A zlib stream of `data`, stored without compression (the image is tiny).
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::none());
    // Writing into a Vec cannot fail.
    let _ = encoder.write_all(data);
    encoder.finish().unwrap_or_default()
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
        assert_eq!(
            check(&good, 5),
            Err(SelfTestError::PastLabels {
                index: 5,
                labels: 5
            })
        );
        // A classifier of 3 classes answers all 3 when asked for 5.
        assert_eq!(
            check(&good, 3),
            Err(SelfTestError::ClassCount { wanted: 3, got: 5 })
        );
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
        assert!(matches!(
            check(&unranked, 1000),
            Err(SelfTestError::NotRanked(_))
        ));
    }

    /// An ImageNet classifier is asked once, for the known photo, and the answer must be well
    /// formed and recognise it.
    #[test]
    fn an_imagenet_classifier_is_checked_with_one_classification_of_the_photo() {
        let score = |index, prob| GuestScore { index, prob };
        let info = GuestInfo {
            labels: ["goose", "pelican", "heron", "stork", "crane", "swan"]
                .map(String::from)
                .to_vec(),
            ..Default::default()
        };
        let answer = |pelican_first: bool| {
            let (a, b) = if pelican_first { (1, 0) } else { (0, 1) };
            vec![
                score(a, 0.5),
                score(b, 0.2),
                score(2, 0.1),
                score(3, 0.1),
                score(4, 0.05),
            ]
        };
        let mut images = Vec::new();
        let mut recognising = |image: &[u8], k: u32| {
            images.push((image.to_vec(), k));
            Ok(GuestClassification {
                top: answer(true),
                ..Default::default()
            })
        };
        let (_, checked) = run_saying(&mut recognising, &info).expect("passes");
        assert_eq!(checked, Checked::ShapeAndPhoto);
        assert_eq!(images, vec![(PHOTO.to_vec(), 5)]);
        let mut misreading = |_: &[u8], _: u32| {
            Ok(GuestClassification {
                top: answer(false),
                ..Default::default()
            })
        };
        assert!(matches!(
            run_saying(&mut misreading, &info),
            Err(SelfTestError::Misread { .. })
        ));
        let mut short = |_: &[u8], _: u32| {
            Ok(GuestClassification {
                top: answer(true)[..1].to_vec(),
                ..Default::default()
            })
        };
        assert!(matches!(
            run_saying(&mut short, &info),
            Err(SelfTestError::ClassCount { wanted: 5, got: 1 })
        ));
    }

    /// A classifier of three classes: every answer ranks the same three, so only the shape and
    /// determinism can be checked, and `run_saying` says so; a model whose answers wander fails.
    #[test]
    fn a_classifier_of_other_classes_is_checked_for_shape_and_determinism() {
        let score = |index, prob| GuestScore { index, prob };
        let info = GuestInfo {
            labels: vec!["red".into(), "green".into(), "blue".into()],
            ..Default::default()
        };
        let steady = |_: &[u8], _: u32| {
            Ok(GuestClassification {
                top: vec![score(2, 0.5), score(0, 0.3), score(1, 0.2)],
                ..Default::default()
            })
        };
        let (_, checked) = run_saying(&mut { steady }, &info).expect("passes");
        assert_eq!(checked, Checked::ShapeAndDeterminism);
        let mut calls = 0u32;
        let mut flipping = |_: &[u8], _: u32| {
            calls += 1;
            let (a, b) = if calls == 1 { (0, 1) } else { (1, 0) };
            Ok(GuestClassification {
                top: vec![score(a, 0.5), score(b, 0.3), score(2, 0.2)],
                ..Default::default()
            })
        };
        assert!(matches!(
            run_saying(&mut flipping, &info),
            Err(SelfTestError::NotDeterministic { .. })
        ));
    }
}
