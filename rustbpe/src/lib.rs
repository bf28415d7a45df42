//! rustbpe: a fast byte-level BPE trainer (GPT-4 style split) with Python bindings.
//!
//! Python: `tok = rustbpe.Tokenizer(); tok.train_from_iterator(texts, vocab_size)`, then
//! `tok.get_mergeable_ranks()` feeds `tiktoken.Encoding` for fast inference.

pub mod count;
pub mod split;
pub mod train;

use ahash::AHashMap;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyIterator, PyString};
use pyo3::AsPyPointer;
use rayon::prelude::*;
use std::time::Instant;

use count::ChunkCounts;
use split::Splitter;

#[pyclass(module = "rustbpe")]
pub struct Tokenizer {
    pattern: String,
    splitter: Splitter,
    merges: Vec<(u32, u32)>,
    /// pair -> id of the token it merges into (= its rank)
    ranks: AHashMap<train::Pair, u32>,
}

/// UTF-8 bytes of a Python str as a new bytes object (a copy: the caller's str is left alone).
fn utf8_of<'p>(py: Python<'p>, item: &'p PyAny) -> PyResult<&'p PyBytes> {
    let s: &PyString = item
        .downcast()
        .map_err(|_| PyTypeError::new_err(format!("expected str documents, got {}", item.get_type())))?;
    unsafe { py.from_owned_ptr_or_err(pyo3::ffi::PyUnicode_AsUTF8String(s.as_ptr())) }
}

/// Pull documents in batches under the GIL; split and count each batch without it.
fn count_documents(
    py: Python<'_>,
    iterator: &PyAny,
    buffer_size: usize,
    splitter: &Splitter,
) -> PyResult<ChunkCounts> {
    let mut iter = PyIterator::from_object(py, iterator)?;
    let mut counts = ChunkCounts::default();
    let mut exhausted = false;
    while !exhausted {
        // SAFETY: a pool per batch releases the batch's Python objects before the next batch;
        // nothing borrowed from them outlives this loop iteration.
        let pool = unsafe { py.new_pool() };
        let py = pool.python();
        let mut batch: Vec<&PyBytes> = Vec::with_capacity(buffer_size.min(1 << 16));
        while batch.len() < buffer_size {
            match iter.next() {
                Some(item) => batch.push(utf8_of(py, item?)?),
                None => {
                    exhausted = true;
                    break;
                }
            }
        }
        // SAFETY: the bytes come from PyUnicode_AsUTF8String: valid UTF-8.
        let docs: Vec<&str> =
            batch.iter().map(|b| unsafe { std::str::from_utf8_unchecked(b.as_bytes()) }).collect();
        py.allow_threads(|| counts.add_batch(splitter, &docs)).map_err(split_err)?;
        py.check_signals()?; // Ctrl-C works between batches
    }
    Ok(counts)
}

fn split_err(e: String) -> PyErr {
    PyValueError::new_err(e)
}

#[pymethods]
impl Tokenizer {
    #[new]
    fn new() -> Self {
        let pattern = split::default_pattern();
        Tokenizer {
            splitter: Splitter::new(&pattern).expect("default pattern"),
            pattern,
            merges: vec![],
            ranks: AHashMap::new(),
        }
    }

    /// Train on an iterator of str documents. Documents are pulled `buffer_size` at a time,
    /// split and counted in parallel with the GIL released, then dropped.
    /// `vocab_size` counts the 256 byte tokens; a corpus with too few pairs is a ValueError.
    /// Set RUSTBPE_LOG=1 to print the time of each phase to stderr.
    #[args(buffer_size = "8192", pattern = "None")]
    fn train_from_iterator(
        &mut self,
        py: Python<'_>,
        iterator: &PyAny,
        vocab_size: usize,
        buffer_size: usize,
        pattern: Option<String>,
    ) -> PyResult<()> {
        if vocab_size < 256 {
            return Err(PyValueError::new_err(format!(
                "vocab_size must be at least 256 (the byte tokens), got {vocab_size}"
            )));
        }
        let pattern = pattern.unwrap_or_else(split::default_pattern);
        let splitter = Splitter::new(&pattern).map_err(split_err)?;
        let t0 = Instant::now();
        let counts = count_documents(py, iterator, buffer_size.max(1), &splitter)?;
        let (unique, t1) = (counts.unique(), Instant::now());
        let merges =
            py.allow_threads(|| train::train(counts.into_words(), vocab_size - 256)).map_err(|done| {
                PyValueError::new_err(format!(
                    "vocab_size {vocab_size} is more than this corpus can give: no pair is left after \
                 {done} merges (at most {} tokens)",
                    256 + done
                ))
            })?;
        if std::env::var_os("RUSTBPE_LOG").is_some() {
            let (count_s, merge_s) = ((t1 - t0).as_secs_f64(), t1.elapsed().as_secs_f64());
            eprintln!("rustbpe: counted {unique} unique chunks in {count_s:.3}s, merged in {merge_s:.3}s");
        }
        self.ranks =
            merges.iter().enumerate().map(|(i, &(a, b))| (train::pair(a, b), 256 + i as u32)).collect();
        self.merges = merges;
        self.pattern = pattern;
        self.splitter = splitter;
        Ok(())
    }

    /// The split regex the tokenizer was trained with.
    fn get_pattern(&self) -> String {
        self.pattern.clone()
    }

    /// Number of tokens: 256 bytes + merges.
    #[getter]
    fn vocab_size(&self) -> usize {
        256 + self.merges.len()
    }

    /// The merges in order: merge i joins (left, right) into token 256 + i.
    fn get_merges(&self) -> Vec<(u32, u32)> {
        self.merges.clone()
    }

    /// [(token bytes, rank)] for tiktoken: the 256 single bytes first (rank = byte value), then
    /// one entry per merge.
    fn get_mergeable_ranks<'p>(&self, py: Python<'p>) -> Vec<(&'p PyBytes, u32)> {
        train::token_bytes(&self.merges)
            .iter()
            .enumerate()
            .map(|(i, t)| (PyBytes::new(py, t), i as u32))
            .collect()
    }

    /// Reference encoder (slow-ish; use tiktoken for real work): split, then BPE each chunk.
    fn encode(&self, text: &str) -> PyResult<Vec<u32>> {
        self.encode_text(text).map_err(split_err)
    }

    /// `encode` over many texts in parallel (GIL released).
    fn batch_encode(&self, py: Python<'_>, texts: Vec<String>) -> PyResult<Vec<Vec<u32>>> {
        py.allow_threads(|| texts.par_iter().map(|t| self.encode_text(t)).collect::<Result<Vec<_>, _>>())
            .map_err(split_err)
    }
}

impl Tokenizer {
    fn encode_text(&self, text: &str) -> Result<Vec<u32>, String> {
        let mut out = Vec::with_capacity(text.len() / 3);
        self.splitter.for_each(text, |chunk| train::encode_chunk(chunk.as_bytes(), &self.ranks, &mut out))?;
        Ok(out)
    }
}

/// Split `text` into chunks with `pattern` (default: nanochat's GPT-4 style pattern).
/// `fast=False` forces fancy-regex instead of the built-in scanner (for tests).
#[pyfunction(pattern = "None", fast = "true")]
fn split_text(text: &str, pattern: Option<String>, fast: bool) -> PyResult<Vec<String>> {
    let pattern = pattern.unwrap_or_else(split::default_pattern);
    let splitter =
        if fast { Splitter::new(&pattern) } else { Splitter::regex(&pattern) }.map_err(split_err)?;
    let mut out = Vec::new();
    splitter.for_each(text, |c| out.push(c.to_string())).map_err(split_err)?;
    Ok(out)
}

/// True if `pattern` is served by the built-in scanner rather than fancy-regex.
#[pyfunction]
fn has_fast_splitter(pattern: &str) -> bool {
    matches!(Splitter::new(pattern), Ok(Splitter::Gpt4 { .. }))
}

#[pymodule]
fn rustbpe(_py: Python, m: &PyModule) -> PyResult<()> {
    m.add_class::<Tokenizer>()?;
    m.add_function(wrap_pyfunction!(split_text, m)?)?;
    m.add_function(wrap_pyfunction!(has_fast_splitter, m)?)?;
    m.add("SPLIT_PATTERN", split::default_pattern())?;
    Ok(())
}
