//! Version ordering (`isomesh_module::version`): whatever the strings, comparing never panics,
//! and on versions that parse it is a total order: antisymmetric (a < b exactly when b > a),
//! reflexive, and transitive over three versions. A broken order would let a node be walked
//! back to an older module one "upgrade" at a time.
#![no_main]

use isomesh_module::version::compare_versions;
use libfuzzer_sys::fuzz_target;
use std::cmp::Ordering;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let parts: Vec<&str> = text.splitn(3, '\n').collect();
    let [a, b, c] = [0, 1, 2].map(|i| parts.get(i).copied().unwrap_or("0.0.0"));
    let ab = compare_versions(a, b);
    let ba = compare_versions(b, a);
    match (&ab, &ba) {
        (Ok(x), Ok(y)) => assert_eq!(*x, y.reverse(), "{a:?} vs {b:?}"),
        (Err(_), Err(_)) => {}
        _ => panic!("comparing {a:?} and {b:?} fails one way only"),
    }
    if let Ok(same) = compare_versions(a, a) {
        assert_eq!(same, Ordering::Equal, "{a:?}");
    }
    if let (Ok(ab), Ok(bc), Ok(ac)) = (ab, compare_versions(b, c), compare_versions(a, c)) {
        if ab != Ordering::Greater && bc != Ordering::Greater {
            assert_ne!(ac, Ordering::Greater, "{a:?} <= {b:?} <= {c:?}");
        }
        if ab == Ordering::Equal && bc == Ordering::Equal {
            assert_eq!(ac, Ordering::Equal, "{a:?} = {b:?} = {c:?}");
        }
    }
});
