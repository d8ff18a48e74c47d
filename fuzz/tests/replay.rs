//! Replays the committed corpus and every kept regression through the
//! target bodies (no libFuzzer needed).

#[test]
fn corpus_replays_cleanly() {
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus");
    for (name, n) in qcow2_guard_fuzz::replay_corpus(&corpus) {
        println!("{name}: {n} inputs");
        assert!(n > 0, "no corpus for target {name}");
    }
}
