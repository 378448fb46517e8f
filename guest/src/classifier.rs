//! The model's plan and what turns its scores into an answer.
//!
//! Building the plan (parse 14 MB of ONNX, optimise, allocate) is the expensive part, so a
//! [`Classifier`] is built once per instance and then serves every call; a call only decodes,
//! runs the plan and ranks the probabilities.
//!
//! The module embeds MobileNetV2 ([`Classifier::load`]), but its code runs any ONNX image
//! classifier it is handed ([`Classifier::from_onnx`]): a new model then needs no new module,
//! and so no new machine code to compile or ship.

use crate::preprocess::{self, Input, InputSpec, Layout};
use crate::Error;
use std::time::Instant;
use tract_core::internal::{EvalContext, OpState};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::tract_core;

static MODEL_ONNX: &[u8] = include_bytes!(env!("ISOMESH_MODEL_PATH"));
static LABELS: &str = include_str!(env!("ISOMESH_LABELS_PATH"));

/// Number of ImageNet classes the model scores.
pub const CLASS_COUNT: usize = 1000;

type Plan = std::sync::Arc<TypedRunnableModel>;

/// A ready-to-run classifier: a model's plan, the input it takes and its class names.
pub struct Classifier {
    plan: Plan,
    input: InputSpec,
    labels: Vec<String>,
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
    /// Parses, types and optimises the embedded MobileNetV2.
    pub fn load() -> Result<Classifier, Error> {
        Classifier::from_onnx(
            MODEL_ONNX,
            labels().map(String::from).collect(),
            InputSpec::IMAGENET_224,
        )
        .map_err(|e| Error::Model(format!("the embedded MobileNetV2: {e}")))
    }

    /// Parses, types and optimises an ONNX classifier whose first input takes `input` and whose
    /// first output scores each of `labels`. Refuses a model that does not fit them.
    pub fn from_onnx(
        onnx: &[u8],
        labels: Vec<String>,
        input: InputSpec,
    ) -> Result<Classifier, Error> {
        if labels.is_empty() {
            return Err(Error::Model("the model comes with no labels".into()));
        }
        if input.side == 0 || input.side > preprocess::MAX_INPUT_SIDE {
            return Err(Error::Model(format!(
                "an input side of {} pixels (1 to {} accepted)",
                input.side,
                preprocess::MAX_INPUT_SIDE
            )));
        }
        let fact = match input.layout {
            Layout::NchwF32ImageNet => f32::fact(input.shape()),
            Layout::NhwcU8 => u8::fact(input.shape()),
        };
        let plan = tract_onnx::onnx()
            .model_for_read(&mut std::io::Cursor::new(onnx))
            .and_then(|model| model.with_input_fact(0, fact.into()))
            .and_then(|model| model.into_optimized())
            .and_then(|model| model.into_runnable())
            .map_err(|e| Error::Model(format!("loading the ONNX model: {e:#}")))?;
        let scores = plan.model().output_fact(0).ok().and_then(|fact| {
            fact.shape
                .as_concrete()
                .map(|dims| dims.iter().product::<usize>())
        });
        match scores {
            Some(count) if count == labels.len() => Ok(Classifier {
                plan,
                input,
                labels,
            }),
            Some(count) => Err(Error::Model(format!(
                "the model scores {count} classes but {} labels came with it",
                labels.len()
            ))),
            None => Err(Error::Model(
                "the model's output has no fixed size: a classifier scores a fixed set of classes"
                    .into(),
            )),
        }
    }

    /// Class names, index order.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// The input the model takes.
    pub fn input(&self) -> InputSpec {
        self.input
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
        let input = preprocess::image_to(image, self.input)?;
        let decoded = Instant::now();
        let shape = self.input.shape();
        let tensor = match &input {
            Input::F32(values) => Tensor::from_shape(&shape, values),
            Input::U8(values) => Tensor::from_shape(&shape, values),
        }
        .map_err(|e| Error::Model(format!("building the input tensor: {e}")))?;
        let outputs = self
            .plan
            .spawn()
            .and_then(|mut state| state.run_plan_with_eval(tvec!(tensor.into()), eval))
            .map_err(|e| Error::Model(format!("running the model: {e:#}")))?;
        let no_logits =
            |why: String| Error::Model(format!("the model returned no f32 scores: {why}"));
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

    /// Every photo's channel means, in the order and scale `spec`'s input holds them.
    fn channel_means(bytes: &[u8], spec: InputSpec) -> [f32; 3] {
        let mut sums = [0f64; 3];
        let count = (spec.side * spec.side) as f64;
        match preprocess::image_to(bytes, spec).expect("decodes") {
            Input::F32(values) => {
                for (i, v) in values.iter().enumerate() {
                    sums[i / (spec.side * spec.side) as usize] += *v as f64;
                }
            }
            Input::U8(values) => {
                for (i, v) in values.iter().enumerate() {
                    sums[i % 3] += *v as f64 / 255.0;
                }
            }
        }
        sums.map(|s| (s / count) as f32)
    }

    fn photos() -> Vec<(String, Vec<u8>)> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../photos");
        let mut photos: Vec<_> = std::fs::read_dir(dir)
            .expect("photos/")
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| {
                path.extension()
                    .is_some_and(|ext| ext == "jpg" || ext == "jpeg" || ext == "png")
            })
            .map(|path| {
                let bytes = std::fs::read(&path).expect("photo");
                (path.display().to_string(), bytes)
            })
            .collect();
        photos.sort();
        assert!(photos.len() >= 5, "{photos:?}");
        photos
    }

    /// The module's code serves a model it did not embed, with that model's labels and input
    /// layout: every answer is the photo's strongest channel, as the test works it out itself.
    #[test]
    fn a_model_handed_in_answers_with_its_own_labels_in_either_layout() {
        let labels: Vec<String> = crate::means_model::LABELS.map(String::from).to_vec();
        for layout in [Layout::NchwF32ImageNet, Layout::NhwcU8] {
            let spec = InputSpec { layout, side: 64 };
            let classifier =
                Classifier::from_onnx(&crate::means_model::onnx(spec), labels.clone(), spec)
                    .expect("the means model loads");
            assert_eq!(classifier.labels(), labels.as_slice());
            let mut seen = std::collections::BTreeSet::new();
            for (name, bytes) in photos() {
                let means = channel_means(&bytes, spec);
                let expected = top_k_softmax(&means, 3);
                let answer = classifier.classify(&bytes, 3).expect("classifies");
                assert_eq!(
                    answer.top[0].0, expected[0].0,
                    "{name} {layout:?}: {means:?}"
                );
                assert!(
                    (answer.top[0].1 - expected[0].1).abs() < 1e-3,
                    "{name} {layout:?}: {answer:?} vs {expected:?}"
                );
                seen.insert(answer.top[0].0);
            }
            // The photos are not all one colour: the answers depend on them.
            assert!(seen.len() >= 2, "{layout:?}: every photo answered {seen:?}");
        }
    }

    #[test]
    fn a_model_that_does_not_fit_its_labels_or_input_is_refused() {
        let spec = InputSpec {
            layout: Layout::NchwF32ImageNet,
            side: 32,
        };
        let onnx = crate::means_model::onnx(spec);
        let two = vec!["red".to_string(), "green".to_string()];
        let refused = |result: Result<Classifier, Error>| match result {
            Err(Error::Model(why)) => why,
            Err(other) => panic!("not a model error: {other:?}"),
            Ok(_) => panic!("accepted"),
        };
        let why = refused(Classifier::from_onnx(&onnx, two, spec));
        assert!(why.contains("scores 3 classes but 2 labels"), "{why}");
        let why = refused(Classifier::from_onnx(&onnx, vec![], spec));
        assert!(why.contains("no labels"), "{why}");
        let labels: Vec<String> = crate::means_model::LABELS.map(String::from).to_vec();
        let why = refused(Classifier::from_onnx(b"not onnx", labels.clone(), spec));
        assert!(why.contains("loading the ONNX model"), "{why}");
        let huge = InputSpec {
            side: preprocess::MAX_INPUT_SIDE + 1,
            ..spec
        };
        let why = refused(Classifier::from_onnx(&onnx, labels.clone(), huge));
        assert!(why.contains("input side"), "{why}");
        // The model takes u8 channels last; the input said f32 channels first. tract types it
        // anyway (its Cast takes f32 too), so the refusal is for the 32 scores that come out.
        let nhwc = InputSpec {
            layout: Layout::NhwcU8,
            side: 32,
        };
        let why = refused(Classifier::from_onnx(
            &crate::means_model::onnx(nhwc),
            labels,
            spec,
        ));
        assert!(why.contains("scores 32 classes but 3 labels"), "{why}");
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
