//! Turns encoded image bytes into a classifier's input. The embedded MobileNetV2 takes the
//! standard ImageNet preprocessing of `models/README.md` (resize the shorter side to 256
//! bilinearly, centre-crop 224x224, scale to [0,1], normalise by the ImageNet mean and std,
//! channels first); a model handed in at run time ([`InputSpec`]) may take another side, or the
//! raw pixels channels last as TensorFlow Lite's quantised classifiers do.
//!
//! Decoding happens here, inside the sandbox, so a hostile image can at worst trap the guest. The
//! decoder limits reject a decompression bomb (a tiny PNG declaring 30000x30000 pixels) from its
//! header, before anything is allocated.

use crate::Error;
use image::{imageops::FilterType, ImageError, ImageFormat, ImageReader, Limits, RgbImage};
use std::io::Cursor;

/// Side of the square the embedded model sees.
pub const INPUT_SIDE: u32 = 224;
/// Largest input side a model may ask for.
pub const MAX_INPUT_SIDE: u32 = 1024;
/// Largest width or height accepted (a 64-megapixel image).
pub const MAX_SIDE: u32 = 8192;
/// Largest allocation the decoder may make, in bytes.
const MAX_DECODE_BYTES: u64 = 256 << 20;
/// Longest-to-shortest side ratio accepted; past it the resized image would be huge.
const MAX_ASPECT: u32 = 16;

const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// How the pixels of the crop become the model's input tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// f32 `[1, 3, side, side]`, `(p/255 - mean)/std` with ImageNet's mean and std.
    NchwF32ImageNet,
    /// u8 `[1, side, side, 3]`, the pixels as they are.
    NhwcU8,
}

/// The input a model takes (`GuestInput` of the ABI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputSpec {
    pub layout: Layout,
    /// Side of the square crop, pixels.
    pub side: u32,
}

impl InputSpec {
    /// The embedded MobileNetV2's input.
    pub const IMAGENET_224: InputSpec = InputSpec {
        layout: Layout::NchwF32ImageNet,
        side: INPUT_SIDE,
    };

    /// The input a `GuestInput` of the ABI describes: ImageNet's float32 channels first and a
    /// side of 224 where it says nothing (no input, side 0).
    pub fn from_guest(input: Option<&isomesh_protos::GuestInput>) -> InputSpec {
        use isomesh_protos::guest_input::Layout as GuestLayout;
        let Some(input) = input else {
            return InputSpec::IMAGENET_224;
        };
        InputSpec {
            layout: match input.layout() {
                GuestLayout::NchwF32Imagenet => Layout::NchwF32ImageNet,
                GuestLayout::NhwcU8 => Layout::NhwcU8,
            },
            side: if input.side == 0 {
                INPUT_SIDE
            } else {
                input.side
            },
        }
    }

    /// The tensor's shape, as the model declares its input.
    pub fn shape(&self) -> [usize; 4] {
        let side = self.side as usize;
        match self.layout {
            Layout::NchwF32ImageNet => [1, 3, side, side],
            Layout::NhwcU8 => [1, side, side, 3],
        }
    }
}

/// A model's input, flattened in its layout's order.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    F32(Vec<f32>),
    U8(Vec<u8>),
}

/// Decodes `bytes` and returns the embedded model's `[1, 3, 224, 224]` input, flattened
/// channels first.
pub fn image_to_input(bytes: &[u8]) -> Result<Vec<f32>, Error> {
    let crop = decode_and_crop(bytes, INPUT_SIDE)?;
    Ok(nchw_imagenet(&crop))
}

/// Decodes `bytes` and returns the input `spec` describes.
pub fn image_to(bytes: &[u8], spec: InputSpec) -> Result<Input, Error> {
    let crop = decode_and_crop(bytes, spec.side)?;
    Ok(match spec.layout {
        Layout::NchwF32ImageNet => Input::F32(nchw_imagenet(&crop)),
        Layout::NhwcU8 => Input::U8(crop.into_raw()),
    })
}

/// Decodes `bytes`, resizes the shorter side to `side` x 8/7 (256 for 224) and crops the centre
/// square of `side` pixels.
fn decode_and_crop(bytes: &[u8], side: u32) -> Result<RgbImage, Error> {
    if bytes.is_empty() {
        return Err(Error::EmptyInput);
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::BadImage(e.to_string()))?;
    if reader.format().is_none() {
        return Err(Error::BadImage(
            "unrecognised header, not a JPEG or PNG file".into(),
        ));
    }
    if reader.format() == Some(ImageFormat::Jpeg) {
        check_jpeg_complete(bytes)?;
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    let image = reader.decode().map_err(|e| match e {
        ImageError::Limits(limit) => Error::ImageTooLarge(format!(
            "{limit} (at most {MAX_SIDE}x{MAX_SIDE} pixels are accepted)"
        )),
        other => Error::BadImage(other.to_string()),
    })?;
    let rgb = image.into_rgb8();
    let (width, height) = rgb.dimensions();
    if width == 0 || height == 0 {
        return Err(Error::BadImage(format!("image is {width}x{height} pixels")));
    }
    let (short, long) = (width.min(height), width.max(height));
    if long > short.saturating_mul(MAX_ASPECT) {
        return Err(Error::ImageTooLarge(format!(
            "{width}x{height} has an aspect ratio over {MAX_ASPECT}:1"
        )));
    }
    // torchvision's Resize(256) for a 224 crop: the shorter side becomes 256, the other is
    // truncated.
    let resize_side = (side * 8).div_ceil(7);
    let (new_w, new_h) = if width <= height {
        (
            resize_side,
            (height as u64 * resize_side as u64 / width as u64) as u32,
        )
    } else {
        (
            (width as u64 * resize_side as u64 / height as u64) as u32,
            resize_side,
        )
    };
    let resized = image::imageops::resize(&rgb, new_w, new_h, FilterType::Triangle);
    // torchvision's CenterCrop rounds the offset.
    let left = ((new_w - side) as f32 / 2.0).round() as u32;
    let top = ((new_h - side) as f32 / 2.0).round() as u32;
    Ok(image::imageops::crop_imm(&resized, left, top, side, side).to_image())
}

/// The crop as `(p/255 - mean)/std`, channels first.
fn nchw_imagenet(crop: &RgbImage) -> Vec<f32> {
    let (width, height) = crop.dimensions();
    let plane = (width * height) as usize;
    let mut input = vec![0f32; 3 * plane];
    let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * STD[c]));
    let bias: [f32; 3] = std::array::from_fn(|c| -MEAN[c] / STD[c]);
    for (at, pixel) in crop.pixels().enumerate() {
        for c in 0..3 {
            input[c * plane + at] = pixel.0[c] as f32 * scale[c] + bias[c];
        }
    }
    input
}

/// The JPEG decoder fills a truncated scan with grey and answers anyway, so a cut-off upload
/// would be classified as a different picture. A complete file has an end-of-image marker
/// (FF D9) after the start of its last scan (FF DA); neither can occur inside entropy-coded
/// data, where FF is always followed by 00 or a restart marker.
fn check_jpeg_complete(bytes: &[u8]) -> Result<(), Error> {
    let last = |marker: u8| bytes.windows(2).rposition(|w| w == [0xff, marker]);
    match (last(0xda), last(0xd9)) {
        (Some(scan), Some(end)) if end > scan => Ok(()),
        (None, _) => Err(Error::BadImage("JPEG has no image scan".into())),
        _ => Err(Error::BadImage(
            "truncated JPEG: the file ends before its end-of-image marker".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_random_bytes_are_rejected() {
        assert_eq!(image_to_input(&[]), Err(Error::EmptyInput));
        assert!(matches!(
            image_to_input(&[7u8; 1000]),
            Err(Error::BadImage(_))
        ));
    }

    /// A PNG whose header declares `width` x `height` pixels and that holds no row at all.
    fn png_declaring(width: u32, height: u32) -> Vec<u8> {
        let mut png = Vec::new();
        let mut encoder = png::Encoder::new(&mut png, width, height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        // Dropping the writer ends the file (IEND) without a single row.
        drop(encoder.write_header().expect("a PNG header"));
        png
    }

    #[test]
    fn decompression_bomb_is_rejected_from_its_header() {
        let bomb = png_declaring(30_000, 30_000);
        assert!(matches!(
            image_to_input(&bomb),
            Err(Error::ImageTooLarge(_))
        ));
    }

    #[test]
    fn both_layouts_hold_the_same_crop() {
        let bytes = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../photos/banana.jpg"))
            .expect("photos/banana.jpg");
        let nchw = image_to_input(&bytes).expect("decodes");
        let nhwc = match image_to(
            &bytes,
            InputSpec {
                layout: Layout::NhwcU8,
                side: 224,
            },
        ) {
            Ok(Input::U8(pixels)) => pixels,
            other => panic!("{other:?}"),
        };
        assert_eq!(nhwc.len(), 224 * 224 * 3);
        assert_eq!(nchw.len(), nhwc.len());
        let plane = 224 * 224;
        for (i, &p) in nhwc.iter().enumerate() {
            let (at, c) = (i / 3, i % 3);
            let normalised = (p as f32 / 255.0 - MEAN[c]) / STD[c];
            assert!((nchw[c * plane + at] - normalised).abs() < 1e-4, "{i}");
        }
        // Another side crops another square from a proportionally resized image.
        let small = image_to(
            &bytes,
            InputSpec {
                layout: Layout::NhwcU8,
                side: 96,
            },
        );
        assert!(matches!(small, Ok(Input::U8(p)) if p.len() == 96 * 96 * 3));
    }

    #[test]
    fn the_abi_input_says_layout_and_side_and_defaults_to_imagenet_224() {
        use isomesh_protos::{guest_input, GuestInput};
        assert_eq!(InputSpec::from_guest(None), InputSpec::IMAGENET_224);
        let unsaid = GuestInput::default();
        assert_eq!(
            InputSpec::from_guest(Some(&unsaid)),
            InputSpec::IMAGENET_224
        );
        let nhwc = GuestInput {
            layout: guest_input::Layout::NhwcU8 as i32,
            side: 96,
        };
        assert_eq!(
            InputSpec::from_guest(Some(&nhwc)),
            InputSpec {
                layout: Layout::NhwcU8,
                side: 96
            }
        );
    }

    #[test]
    fn truncated_jpeg_is_rejected() {
        let bytes = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../photos/banana.jpg"))
            .expect("photos/banana.jpg");
        let result = image_to_input(&bytes[..bytes.len() / 3]);
        assert!(matches!(result, Err(Error::BadImage(_))), "{result:?}");
    }
}
