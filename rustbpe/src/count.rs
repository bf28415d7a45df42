//! Counting unique chunks over a stream of document batches (documents are counted, not kept).

use crate::split::Splitter;
use crate::train::Words;
use ahash::AHashMap;
use rayon::prelude::*;

/// Chunks of up to 15 bytes are packed with their length into one u128 key: no allocation,
/// cheap hashing and comparing. Nearly all chunks (" the", " acknowledged") are that short.
const SMALL: usize = 15;

#[inline(always)]
fn pack(chunk: &[u8]) -> u128 {
    let mut buf = [0u8; 16];
    buf[..chunk.len()].copy_from_slice(chunk);
    buf[15] = chunk.len() as u8;
    u128::from_le_bytes(buf)
}

fn unpack(key: u128) -> ([u8; SMALL], usize) {
    let len = (key >> 120) as usize;
    let mut out = [0u8; SMALL];
    for (i, o) in out.iter_mut().enumerate() {
        *o = (key >> (8 * i)) as u8;
    }
    (out, len)
}

#[derive(Default)]
struct Local<'t> {
    small: AHashMap<u128, u64>,
    large: AHashMap<&'t [u8], u64>,
}

impl<'t> Local<'t> {
    #[inline(always)]
    fn add(&mut self, chunk: &'t [u8]) {
        if chunk.len() <= 1 {
        } else if chunk.len() <= SMALL {
            *self.small.entry(pack(chunk)).or_insert(0) += 1;
        } else {
            *self.large.entry(chunk).or_insert(0) += 1;
        }
    }
}

/// Cut `docs` into at most `n` contiguous shares of about equal bytes.
fn shares_by_bytes<'a, 't>(docs: &'a [&'t str], n: usize) -> Vec<&'a [&'t str]> {
    let total: usize = docs.iter().map(|d| d.len()).sum();
    let per_share = total / n.max(1) + 1;
    let (mut shares, mut start, mut acc) = (Vec::with_capacity(n), 0, 0);
    for (i, doc) in docs.iter().enumerate() {
        acc += doc.len();
        if acc >= per_share {
            shares.push(&docs[start..=i]);
            (start, acc) = (i + 1, 0);
        }
    }
    if start < docs.len() {
        shares.push(&docs[start..]);
    }
    shares
}

/// Unique chunk -> number of occurrences, accumulated batch by batch.
#[derive(Default)]
pub struct ChunkCounts {
    small: AHashMap<u128, u64>,
    large: AHashMap<Box<[u8]>, u64>,
}

impl ChunkCounts {
    /// Split and count one batch of documents in parallel: one contiguous share of the batch
    /// (by bytes) per thread, each into its own map, then the maps are added up. (Finer-grained
    /// work stealing would build many maps whose merging costs more than it balances.)
    /// Single-byte chunks are skipped: they hold no pair, so they never matter to BPE.
    pub fn add_batch(&mut self, splitter: &Splitter, docs: &[&str]) -> Result<(), String> {
        let locals = shares_by_bytes(docs, rayon::current_num_threads())
            .into_par_iter()
            .map(|share| {
                let mut acc = Local::default();
                for doc in share {
                    splitter.for_each(doc, |chunk| acc.add(chunk.as_bytes()))?;
                }
                Ok(acc)
            })
            .collect::<Result<Vec<Local>, String>>()?;
        for local in locals {
            self.absorb(local);
        }
        Ok(())
    }

    fn absorb(&mut self, local: Local) {
        if self.small.is_empty() {
            self.small = local.small;
        } else {
            for (k, v) in local.small {
                *self.small.entry(k).or_insert(0) += v;
            }
        }
        for (k, v) in local.large {
            match self.large.get_mut(k) {
                Some(c) => *c += v,
                None => {
                    self.large.insert(k.into(), v);
                }
            }
        }
    }

    pub fn unique(&self) -> usize {
        self.small.len() + self.large.len()
    }

    /// Consume into the trainer's flat word list (order is irrelevant to the merges).
    pub fn into_words(self) -> Words {
        let bytes = self.small.len() * SMALL + self.large.keys().map(|k| k.len()).sum::<usize>();
        let mut words = Words::with_capacity(self.unique(), bytes);
        for (k, v) in self.small {
            let (buf, len) = unpack(k);
            words.push(&buf[..len], v);
        }
        for (k, v) in self.large {
            words.push(&k, v);
        }
        words
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_every_document_once() {
        let docs: Vec<&str> = vec!["a", "bbbbbbbbbb", "", "cc", "d", "eeeeeeeeeeeeeeeeeeee", "f"];
        for n in 1..=9 {
            let shares = shares_by_bytes(&docs, n);
            assert!(shares.len() <= n.max(1) && shares.iter().all(|s| !s.is_empty()));
            assert_eq!(shares.concat(), docs, "n = {n}");
        }
        assert!(shares_by_bytes(&[], 2).is_empty());
    }

    #[test]
    fn pack_round_trips() {
        for chunk in [&b"ab"[..], b"\0\0", b"fifteen bytes!!", b"a\0"] {
            let (buf, len) = unpack(pack(chunk));
            assert_eq!(&buf[..len], chunk);
        }
        assert_ne!(pack(b"a\0"), pack(b"a\0\0"));
    }
}
