//! A model apart from the code that runs it: an ONNX image classifier, its class names and the
//! input it takes, as the classifier module's code is handed it (`GuestModel`,
//! `isomesh_load_model` in `protos/proto/isomesh.proto`). The module's code (tract, the
//! preprocessing, the ABI) changes rarely and costs a compile; a model changes often and costs
//! only building its plan, so a new model served by code a node already has needs no new machine
//! code.
//!
//! [`read`] reads a model and its labels from files, as a user brings them; the checks that need
//! the model parsed (its input and output fit the labels and layout) are the guest's, which
//! refuses a model that does not fit and keeps serving the one it had.

use crate::digest::sha256_hex;
use isomesh_protos::{guest_input::Layout, GuestInput, GuestModel};
use std::path::{Path, PathBuf};

/// Largest ONNX file accepted, bytes: the same bound as a module's.
pub const MAX_MODEL_SIZE: u64 = crate::package::MAX_MODULE_SIZE;

/// Why a model's files cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is {size} bytes, past the {MAX_MODEL_SIZE}-byte limit of a model")]
    TooLarge { path: PathBuf, size: u64 },
    #[error("{path}:{line}: {why}")]
    Labels {
        path: PathBuf,
        line: usize,
        why: String,
    },
    #[error(
        "{path} holds no labels: give one class name a line, in the order of the model's outputs"
    )]
    NoLabels { path: PathBuf },
}

/// Parses an input layout as the command line names it: `nchw-f32-imagenet` or `nhwc-u8`.
pub fn parse_layout(name: &str) -> Result<Layout, String> {
    match name {
        "nchw-f32-imagenet" => Ok(Layout::NchwF32Imagenet),
        "nhwc-u8" => Ok(Layout::NhwcU8),
        other => Err(format!(
            "{other:?} is not an input layout: nchw-f32-imagenet (float32 channels first, \
             normalised as torchvision does) or nhwc-u8 (raw pixels channels last, as \
             TensorFlow Lite's quantised classifiers take them)"
        )),
    }
}

/// The command line's name of `layout`.
pub fn layout_name(layout: Layout) -> &'static str {
    match layout {
        Layout::NchwF32Imagenet => "nchw-f32-imagenet",
        Layout::NhwcU8 => "nhwc-u8",
    }
}

/// Reads the ONNX file at `onnx` and the class names at `labels` (one a line, index order) into
/// the model a module's code is handed, named by the ONNX file's sha256.
pub fn read(onnx: &Path, labels: &Path, input: GuestInput) -> Result<GuestModel, ModelError> {
    let read_error = |path: &Path| {
        let path = path.to_owned();
        move |source| ModelError::Read { path, source }
    };
    let size = std::fs::metadata(onnx).map_err(read_error(onnx))?.len();
    if size > MAX_MODEL_SIZE {
        return Err(ModelError::TooLarge {
            path: onnx.to_owned(),
            size,
        });
    }
    let bytes = std::fs::read(onnx).map_err(read_error(onnx))?;
    let text = std::fs::read_to_string(labels).map_err(read_error(labels))?;
    let labels = parse_labels(&text).map_err(|(line, why)| match line {
        0 => ModelError::NoLabels {
            path: labels.to_owned(),
        },
        line => ModelError::Labels {
            path: labels.to_owned(),
            line,
            why,
        },
    })?;
    Ok(GuestModel {
        sha256: sha256_hex(&bytes),
        onnx: bytes,
        labels,
        input: Some(input),
    })
}

/// Class names, one a line; a trailing newline ends the last. An empty line in the middle is a
/// mistake (it would shift every class after it), reported with its line number; line 0: none.
fn parse_labels(text: &str) -> Result<Vec<String>, (usize, String)> {
    let labels: Vec<String> = text.lines().map(|l| l.trim_end().to_string()).collect();
    if labels.is_empty() {
        return Err((0, String::new()));
    }
    if let Some(blank) = labels.iter().position(|l| l.trim().is_empty()) {
        return Err((
            blank + 1,
            "an empty class name: every line names the class of the model's output of the same \
             index, so a blank line would shift all that follow"
                .into(),
        ));
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_one_a_line_and_a_blank_line_is_named() {
        assert_eq!(
            parse_labels("red\ngreen\nblue\n"),
            Ok(vec!["red".into(), "green".into(), "blue".into()])
        );
        assert_eq!(parse_labels("a\r\nb").map(|l| l.len()), Ok(2));
        let (line, why) = parse_labels("red\n\nblue\n").unwrap_err();
        assert_eq!(line, 2);
        assert!(why.contains("empty class name"), "{why}");
        assert_eq!(parse_labels("").unwrap_err().0, 0);
    }

    #[test]
    fn a_model_is_read_with_its_digest_and_labels() {
        let dir = tempfile::tempdir().expect("tempdir");
        let onnx = dir.path().join("m.onnx");
        let labels = dir.path().join("labels.txt");
        std::fs::write(&onnx, b"onnx bytes").expect("write");
        std::fs::write(&labels, "cat\ndog\n").expect("write");
        let input = GuestInput {
            layout: Layout::NhwcU8 as i32,
            side: 96,
        };
        let model = read(&onnx, &labels, input).expect("reads");
        assert_eq!(model.sha256, sha256_hex(b"onnx bytes"));
        assert_eq!(model.labels, vec!["cat", "dog"]);
        assert_eq!(model.input, Some(input));
        std::fs::write(&labels, "").expect("write");
        let error = read(&onnx, &labels, input).unwrap_err().to_string();
        assert!(error.contains("holds no labels"), "{error}");
        let error = read(&dir.path().join("none.onnx"), &labels, input)
            .unwrap_err()
            .to_string();
        assert!(error.contains("none.onnx"), "{error}");
    }

    #[test]
    fn layouts_have_command_line_names() {
        for layout in [Layout::NchwF32Imagenet, Layout::NhwcU8] {
            assert_eq!(parse_layout(layout_name(layout)), Ok(layout));
        }
        let error = parse_layout("nchw").unwrap_err();
        assert!(error.contains("nhwc-u8"), "{error}");
    }
}
