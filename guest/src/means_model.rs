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

//!
//! It needs no tract: the few ONNX messages it writes are declared below (the fields used, with
//! `onnx.proto`'s numbers), so the integration tests link it with the guest's preprocessing
//! alone and roll it out as a user's model, and the guest's tests check that tract reads it.

use crate::preprocess::{InputSpec, Layout};
use onnx::{
    dimension, type_proto, AttributeProto, AttributeType, DataType, Dimension, GraphProto,
    ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto,
    ValueInfoProto,
};
use prost::Message;

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
            }],
        ),
    };
    let graph = GraphProto {
        name: "channel_means".into(),
        node,
        initializer,
        input: vec![value_info("input", elem_type, &shape)],
        output: vec![value_info("scores", DataType::Float, &[1, 3])],
    };
    ModelProto {
        ir_version: 7,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        producer_name: "isomesh-guest means_model".into(),
        graph: Some(graph),
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
                        })
                        .collect(),
                }),
            })),
        }),
    }
}

/// The messages of `onnx.proto` (ONNX's IR, opset 13) this model is written with: only the
/// fields it sets, under their numbers there, so the bytes are an ONNX model like any other.
mod onnx {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ModelProto {
        #[prost(int64, tag = "1")]
        pub ir_version: i64,
        #[prost(string, tag = "2")]
        pub producer_name: String,
        #[prost(message, optional, tag = "7")]
        pub graph: Option<GraphProto>,
        #[prost(message, repeated, tag = "8")]
        pub opset_import: Vec<OperatorSetIdProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct OperatorSetIdProto {
        #[prost(string, tag = "1")]
        pub domain: String,
        #[prost(int64, tag = "2")]
        pub version: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GraphProto {
        #[prost(message, repeated, tag = "1")]
        pub node: Vec<NodeProto>,
        #[prost(string, tag = "2")]
        pub name: String,
        #[prost(message, repeated, tag = "5")]
        pub initializer: Vec<TensorProto>,
        #[prost(message, repeated, tag = "11")]
        pub input: Vec<ValueInfoProto>,
        #[prost(message, repeated, tag = "12")]
        pub output: Vec<ValueInfoProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NodeProto {
        #[prost(string, repeated, tag = "1")]
        pub input: Vec<String>,
        #[prost(string, repeated, tag = "2")]
        pub output: Vec<String>,
        #[prost(string, tag = "4")]
        pub op_type: String,
        #[prost(message, repeated, tag = "5")]
        pub attribute: Vec<AttributeProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AttributeProto {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(int64, tag = "3")]
        pub i: i64,
        #[prost(int64, repeated, tag = "8")]
        pub ints: Vec<i64>,
        #[prost(enumeration = "AttributeType", tag = "20")]
        pub r#type: i32,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
    #[repr(i32)]
    pub enum AttributeType {
        Undefined = 0,
        Int = 2,
        Ints = 7,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorProto {
        #[prost(int32, tag = "2")]
        pub data_type: i32,
        #[prost(float, repeated, tag = "4")]
        pub float_data: Vec<f32>,
        #[prost(string, tag = "8")]
        pub name: String,
    }

    /// `TensorProto.DataType`: the element types used here.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    #[repr(i32)]
    pub enum DataType {
        Float = 1,
        Uint8 = 2,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueInfoProto {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(message, optional, tag = "2")]
        pub r#type: Option<TypeProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TypeProto {
        #[prost(oneof = "type_proto::Value", tags = "1")]
        pub value: Option<type_proto::Value>,
    }

    pub mod type_proto {
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct Tensor {
            #[prost(int32, tag = "1")]
            pub elem_type: i32,
            #[prost(message, optional, tag = "2")]
            pub shape: Option<super::TensorShapeProto>,
        }

        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Value {
            #[prost(message, tag = "1")]
            TensorType(Tensor),
        }
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorShapeProto {
        #[prost(message, repeated, tag = "1")]
        pub dim: Vec<Dimension>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Dimension {
        #[prost(oneof = "dimension::Value", tags = "1")]
        pub value: Option<dimension::Value>,
    }

    pub mod dimension {
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Value {
            #[prost(int64, tag = "1")]
            DimValue(i64),
        }
    }
}
