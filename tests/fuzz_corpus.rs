//! The fuzz targets' bodies over the committed corpus (corpus/<target>/)
//! and every input a fuzzer ever found (corpus/regressions/<target>/), so
//! plain `cargo test --workspace` on stable Rust exercises them. The bodies
//! live in the fuzz crate's library (fuzz/src/lib.rs).

#[test]
fn fuzz_corpus_replays_cleanly() {
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (name, n) in qcow2_guard_fuzz::replay_corpus(&corpus) {
        println!("{name}: {n} inputs");
        assert!(n > 0, "no corpus for target {name}");
    }
}

#[test]
fn every_target_survives_trivial_inputs() {
    for (name, body) in qcow2_guard_fuzz::TARGETS {
        for data in [&b""[..], b"QFI\xfb", &[0xff; 200]] {
            println!("{name} on {} bytes", data.len());
            body(data);
        }
    }
}
