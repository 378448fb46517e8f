//! The MobileNetV2 plan and what turns its logits into an answer.
//!
//! Building the plan (parse 14 MB of ONNX, optimise, allocate) is the expensive part, so a
//! [`Classifier`] is built once per instance and then serves every call; a call only decodes,
//! runs the plan and ranks 1000 probabilities.

use crate::{preprocess, Error};
use std::time::Instant;
use tract_core::internal::{EvalContext, OpState};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::tract_core;

static MODEL_ONNX: &[u8] = include_bytes!(env!("ISOMESH_MODEL_PATH"));
static LABELS: &str = include_str!(env!("ISOMESH_LABELS_PATH"));

/// Number of ImageNet classes the model scores.
pub const CLASS_COUNT: usize = 1000;

type Plan = std::sync::Arc<TypedRunnableModel>;

/// A ready-to-run MobileNetV2.
pub struct Classifier {
    plan: Plan,
}

/// The top-k answer for one image, and where its time went.
#[derive(Debug, Clone, PartialEq)]
pub struct Classification {
    /// `(class index, probability)`, most probable first.
    pub top: Vec<(u32, f32)>,
    pub decode_us: u64,
    pub infer_us: u64,
}

/// Class names in index order (1000 lines).
pub fn labels() -> impl Iterator<Item = &'static str> {
    LABELS.lines()
}

impl Classifier {
    /// Parses, types and optimises the embedded model.
    pub fn load() -> Result<Classifier, Error> {
        let side = preprocess::INPUT_SIDE as usize;
        let plan = tract_onnx::onnx()
            .model_for_read(&mut std::io::Cursor::new(MODEL_ONNX))
            .and_then(|model| model.with_input_fact(0, f32::fact([1, 3, side, side]).into()))
            .and_then(|model| model.into_optimized())
            .and_then(|model| model.into_runnable())
            .map_err(|e| Error::Model(format!("loading the embedded MobileNetV2: {e:#}")))?;
        Ok(Classifier { plan })
    }

    /// Classifies one encoded image and returns the `top_k` most probable classes.
    pub fn classify(&self, image: &[u8], top_k: usize) -> Result<Classification, Error> {
        self.run(image, top_k, tract_core::plan::eval)
    }

    /// [`Classifier::classify`], timing each of the plan's operations on the way: where an
    /// inference's time goes, by kind of operation, most expensive first. For `isomesh bench
    /// infer`, which runs it in Wasm and natively to compare the two operation by operation.
    pub fn profile(
        &self,
        image: &[u8],
        top_k: usize,
    ) -> Result<(Classification, Vec<OpTime>), Error> {
        let mut times: Vec<OpTime> = Vec::new();
        let answer = self.run(image, top_k, |ctx, state, node, inputs| {
            let started = Instant::now();
            let outputs = tract_core::plan::eval(ctx, state, node, inputs);
            let spent = started.elapsed().as_nanos() as u64;
            let op = node.op().name();
            match times.iter_mut().find(|t| t.op == op) {
                Some(time) => {
                    time.nodes += 1;
                    time.ns += spent;
                }
                None => times.push(OpTime {
                    op: op.to_string(),
                    nodes: 1,
                    ns: spent,
                }),
            }
            outputs
        })?;
        times.sort_by_key(|t| std::cmp::Reverse(t.ns));
        Ok((answer, times))
    }

    /// Decodes `image`, runs the plan with `eval` evaluating each operation, and ranks.
    fn run<E>(&self, image: &[u8], top_k: usize, eval: E) -> Result<Classification, Error>
    where
        E: for<'a, 'b, 'c> FnMut(
            &'a EvalContext<'a>,
            Option<&'b mut (dyn OpState + 'static)>,
            &'c TypedNode,
            TVec<TValue>,
        ) -> TractResult<TVec<TValue>>,
    {
        let started = Instant::now();
        let input = preprocess::image_to_input(image)?;
        let decoded = Instant::now();
        let side = preprocess::INPUT_SIDE as usize;
        let tensor = Tensor::from_shape(&[1, 3, side, side], &input)
            .map_err(|e| Error::Model(format!("building the input tensor: {e}")))?;
        let outputs = self
            .plan
            .spawn()
            .and_then(|mut state| state.run_plan_with_eval(tvec!(tensor.into()), eval))
            .map_err(|e| Error::Model(format!("running MobileNetV2: {e:#}")))?;
        let no_logits =
            |why: String| Error::Model(format!("the model returned no f32 logits: {why}"));
        let output = outputs
            .first()
            .ok_or_else(|| no_logits("no output".into()))?;
        let view = output
            .try_as_plain_ram()
            .map_err(|e| no_logits(e.to_string()))?;
        let logits = view
            .as_slice::<f32>()
            .map_err(|e| no_logits(e.to_string()))?;
        let top = top_k_softmax(logits, top_k);
        let finished = Instant::now();
        Ok(Classification {
            top,
            decode_us: (decoded - started).as_micros() as u64,
            infer_us: (finished - decoded).as_micros() as u64,
        })
    }
}

/// The time one kind of operation took in a profiled inference.
#[derive(Debug, Clone, PartialEq)]
pub struct OpTime {
    /// tract's name for the operation (`OptMatMul`, `DepthWiseConv`, `Add`...).
    pub op: String,
    /// How many of the plan's nodes run it.
    pub nodes: u32,
    /// Their time together, ns.
    pub ns: u64,
}

/// Softmax over `logits`, then the `k` largest probabilities, highest first.
pub fn top_k_softmax(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    let mut ranked: Vec<(u32, f32)> = exps
        .iter()
        .enumerate()
        .map(|(i, &e)| (i as u32, e / sum))
        .collect();
    ranked.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
    ranked.truncate(k.clamp(1, logits.len().max(1)));
    ranked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_ranks_and_normalises() {
        let top = top_k_softmax(&[1.0, 3.0, 2.0], 2);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        let all: f32 = top_k_softmax(&[1.0, 3.0, 2.0], 3).iter().map(|t| t.1).sum();
        assert!((all - 1.0).abs() < 1e-5);
    }

    #[test]
    fn labels_are_the_thousand_imagenet_classes() {
        let labels: Vec<_> = labels().collect();
        assert_eq!(labels.len(), CLASS_COUNT);
        assert_eq!(labels[285], "Egyptian cat");
        assert_eq!(labels[954], "banana");
    }

    #[test]
    fn a_profiled_classification_answers_as_a_plain_one_and_says_where_its_time_went() {
        let photo = concat!(env!("CARGO_MANIFEST_DIR"), "/../photos/banana.jpg");
        let bytes = std::fs::read(photo).expect("photo");
        let classifier = Classifier::load().expect("model loads");
        let plain = classifier.classify(&bytes, 5).expect("classifies");
        let (profiled, ops) = classifier.profile(&bytes, 5).expect("profiles");
        let classes = |c: &Classification| c.top.iter().map(|t| t.0).collect::<Vec<_>>();
        assert_eq!(classes(&profiled), classes(&plain));
        let matmul = ops
            .iter()
            .find(|o| o.op == "OptMatMul")
            .expect("matrix products");
        assert!(matmul.nodes >= 30 && matmul.ns > 0, "{matmul:?}");
        let timed: u32 = ops.iter().map(|o| o.nodes).sum();
        assert!(timed as usize <= classifier.plan.model().nodes().len());
        assert!(
            ops.windows(2).all(|w| w[0].ns >= w[1].ns),
            "not ranked: {ops:?}"
        );
        // Each operation is timed inside the inference's own window (us, rounded down).
        let spent: u64 = ops.iter().map(|o| o.ns).sum();
        assert!(
            spent <= (profiled.infer_us + 1) * 1000,
            "{spent} ns in {profiled:?}"
        );
    }

    /// The classifier must agree with onnxruntime's top-1 on every photo of `photos/`. The test
    /// runs in Wasm (`make guest-test`), as the module does; the photos are read through WASI.
    #[test]
    fn the_classifier_matches_the_reference_on_real_photos() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../photos");
        let expected =
            std::fs::read_to_string(format!("{dir}/expected.tsv")).expect("expected.tsv");
        let classifier = Classifier::load().expect("model loads");
        for line in expected.lines().skip(1) {
            let fields: Vec<&str> = line.split('\t').collect();
            let (file, index) = (fields[0], fields[1].parse::<u32>().expect("index"));
            let bytes = std::fs::read(format!("{dir}/{file}")).expect("photo");
            let answer = classifier.classify(&bytes, 5).expect("classifies");
            let top1 = answer.top[0].0;
            // elephants.jpg: tusker (101) and African elephant (385) are close calls.
            let ok = top1 == index || (file == "elephants.jpg" && top1 == 385);
            assert!(
                ok,
                "{file}: got {top1} ({:?}), expected {index}",
                answer.top
            );
        }
    }
}
