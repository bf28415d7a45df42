//! Profiling harness: `cargo run --release --example train_file -- FILE VOCAB` where FILE holds
//! documents separated by NUL bytes. Prints the time of each phase.
use rustbpe::{count::ChunkCounts, split, train};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let text = std::fs::read_to_string(&args[1]).expect("read corpus");
    let vocab: usize = args[2].parse().expect("vocab");
    let docs: Vec<&str> = text.split('\0').collect();
    let splitter = split::Splitter::new(&split::default_pattern()).unwrap();
    let t0 = Instant::now();
    let mut counts = ChunkCounts::default();
    for batch in docs.chunks(8192) {
        counts.add_batch(&splitter, batch).unwrap();
    }
    let unique = counts.unique();
    let t1 = Instant::now();
    let words = counts.into_words();
    let t2 = Instant::now();
    let merges = train::train(words, vocab - 256).expect("enough pairs");
    let t3 = Instant::now();
    println!(
        "{} MB, {unique} unique chunks: count {:.3}s, words {:.3}s, train {:.3}s ({} merges)",
        text.len() / 1_000_000,
        (t1 - t0).as_secs_f64(),
        (t2 - t1).as_secs_f64(),
        (t3 - t2).as_secs_f64(),
        merges.len()
    );
}
