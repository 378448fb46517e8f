//! A real ONNX classifier small enough to write in code: it scores `red`, `green` and `blue` by
//! the mean of each channel of its input. What the tests hand the module's code in place of its
//! embedded MobileNetV2 ("a user's own model"): other classes, other labels, any input layout,
//! and an answer a test can work out for itself from the preprocessed photo.
//!
//! Its graph, opset 13:
//! - [`Layout::NchwF32ImageNet`]: `input` f32 `[1, 3, S, S]` -> `ReduceMean(axes 2, 3)` ->
//!   `scores` `[1, 3]`;
//! - [`Layout::NhwcU8`]: `input` u8 `[1, S, S, 3]` -> `Cast(float)` -> `ReduceMean(axes 1, 2)`
//!   -> `Mul(1/255)` -> `scores` `[1, 3]`.

use crate::preprocess::{InputSpec, Layout};
use prost::Message;
use tract_onnx::pb::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto::dimension,
    tensor_shape_proto::Dimension, type_proto, AttributeProto, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

/// The model's class names, index order.
pub const LABELS: [&str; 3] = ["red", "green", "blue"];

/// The encoded ONNX model taking `input`.
pub fn onnx(input: InputSpec) -> Vec<u8> {
    let side = input.side as i64;
    let (elem_type, shape, reduced_axes) = match input.layout {
        Layout::NchwF32ImageNet => (DataType::Float, [1, 3, side, side], [2, 3]),
        Layout::NhwcU8 => (DataType::Uint8, [1, side, side, 3], [1, 2]),
    };
    let reduce = |from: &str, to: &str| NodeProto {
        input: vec![from.into()],
        output: vec![to.into()],
        op_type: "ReduceMean".into(),
        attribute: vec![
            AttributeProto {
                name: "axes".into(),
                r#type: AttributeType::Ints as i32,
                ints: reduced_axes.to_vec(),
                ..Default::default()
            },
            AttributeProto {
                name: "keepdims".into(),
                r#type: AttributeType::Int as i32,
                i: 0,
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let (node, initializer) = match input.layout {
        Layout::NchwF32ImageNet => (vec![reduce("input", "scores")], vec![]),
        Layout::NhwcU8 => (
            vec![
                NodeProto {
                    input: vec!["input".into()],
                    output: vec!["pixels".into()],
                    op_type: "Cast".into(),
                    attribute: vec![AttributeProto {
                        name: "to".into(),
                        r#type: AttributeType::Int as i32,
                        i: DataType::Float as i64,
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                reduce("pixels", "means"),
                NodeProto {
                    input: vec!["means".into(), "scale".into()],
                    output: vec!["scores".into()],
                    op_type: "Mul".into(),
                    ..Default::default()
                },
            ],
            vec![TensorProto {
                name: "scale".into(),
                data_type: DataType::Float as i32,
                float_data: vec![1.0 / 255.0],
                ..Default::default()
            }],
        ),
    };
    let graph = GraphProto {
        name: "channel_means".into(),
        node,
        initializer,
        input: vec![value_info("input", elem_type, &shape)],
        output: vec![value_info("scores", DataType::Float, &[1, 3])],
        ..Default::default()
    };
    ModelProto {
        ir_version: 7,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        producer_name: "isomesh-guest means_model".into(),
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

fn value_info(name: &str, elem_type: DataType, shape: &[i64]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: elem_type as i32,
                shape: Some(TensorShapeProto {
                    dim: shape
                        .iter()
                        .map(|&d| Dimension {
                            value: Some(dimension::Value::DimValue(d)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}
