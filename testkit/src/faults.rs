//! Hand-written modules that speak the guest ABI and misbehave on purpose: they prove that a
//! bad module fails one job or is rejected, and never takes a node down.

use isomesh_protos::GuestScore;
use isomesh_protos::{guest_outcome::Outcome, GuestClassification, GuestInfo, GuestOutcome};
use prost::Message;

/// How a fault module's `isomesh_classify` behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answers five fixed classes, except that an input starting with 0xFF traps and one
    /// starting with 0xFE loops forever.
    OnMarkedInput,
    /// Every call loops: the module cannot pass its self-test.
    AlwaysLoop,
    /// Every call traps: the module cannot pass its self-test.
    AlwaysTrap,
    /// Claims a "pelican" class but answers the same five classes to everything: it passes the
    /// self-test's structural check and fails its photo.
    MissesThePhoto,
}

/// A tiny module that speaks the guest ABI (name `faulty`, version `t1`), misbehaving as `fault` says.
pub fn fault_module(fault: Fault) -> Vec<u8> {
    fault_module_as(fault, "faulty", "t1")
}

/// [`fault_module`] calling itself `name@version`. With [`Fault::OnMarkedInput`] it passes the
/// self-test (its labels are not ImageNet's, so no photo is asked of it) and compiles in
/// milliseconds: a stand-in for the classifier where a test needs a module compiled, not its
/// answers (an emulated node takes minutes over the real one).
pub fn fault_module_as(fault: Fault, name: &str, version: &str) -> Vec<u8> {
    let info = GuestInfo {
        abi_version: 1,
        name: name.into(),
        version: version.into(),
        labels: match fault {
            Fault::MissesThePhoto => ["a", "pelican", "c", "d", "e"],
            _ => ["a", "b", "c", "d", "e"],
        }
        .map(String::from)
        .to_vec(),
        ..Default::default()
    }
    .encode_to_vec();
    let answer = GuestOutcome {
        outcome: Some(Outcome::Classification(GuestClassification {
            top: (0..5)
                .map(|index| GuestScore { index, prob: 0.2 })
                .collect(),
            ..Default::default()
        })),
    }
    .encode_to_vec();
    let loaded = GuestOutcome {
        outcome: Some(Outcome::Classification(GuestClassification::default())),
    }
    .encode_to_vec();
    let escape = |bytes: &[u8]| {
        bytes
            .iter()
            .map(|b| format!("\\{b:02x}"))
            .collect::<String>()
    };
    let classify_body = match fault {
        Fault::AlwaysLoop => "(loop $forever (br $forever)) unreachable".to_string(),
        Fault::AlwaysTrap => "unreachable".to_string(),
        // Answers every input, a JPEG (starting with 0xFF) included.
        Fault::MissesThePhoto => format!(
            "(i64.or (i64.shl (i64.const 2048) (i64.const 32)) (i64.const {}))",
            answer.len()
        ),
        Fault::OnMarkedInput => format!(
            "(if (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 0xff)) (then unreachable))
             (if (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 0xfe)) (then (loop $forever (br $forever))))
             (i64.or (i64.shl (i64.const 2048) (i64.const 32)) (i64.const {}))",
            answer.len()
        ),
    };
    let text = format!(
        r#"(module
          (memory (export "memory") 17)
          (data (i32.const 1024) "{info}")
          (data (i32.const 2048) "{answer}")
          (data (i32.const 3072) "{loaded}")
          (func (export "_initialize"))
          (func (export "isomesh_abi_version") (result i32) (i32.const 1))
          (func (export "isomesh_alloc") (param $len i32) (result i32)
            (if (result i32) (i32.gt_u (local.get $len) (i32.const 1048576))
              (then (i32.const 0)) (else (i32.const 65536))))
          (func (export "isomesh_free") (param i32 i32))
          (func (export "isomesh_info") (result i64)
            (i64.or (i64.shl (i64.const 1024) (i64.const 32)) (i64.const {info_len})))
          (func (export "isomesh_load") (result i64)
            (i64.or (i64.shl (i64.const 3072) (i64.const 32)) (i64.const {loaded_len})))
          (func (export "isomesh_classify") (param $ptr i32) (param $len i32) (param $k i32) (result i64)
            {classify_body}))"#,
        info = escape(&info),
        answer = escape(&answer),
        loaded = escape(&loaded),
        info_len = info.len(),
        loaded_len = loaded.len(),
    );
    wat::parse_str(text).expect("valid WAT")
}
