//! BPE over unique words weighted by their counts.
//!
//! Merge rule (the pure-Python reference in tests/bpe_reference.py implements the same):
//! - the count of a pair is the sum over words of count(word) x occurrences of the pair in the
//!   word (overlapping occurrences, as in "aaa", all count);
//! - each step merges the pair with the highest count; ties go to the smallest (left, right)
//!   pair of token ids;
//! - a merge rewrites every word left to right, replacing non-overlapping occurrences.
//!
//! Incremental: a pair's count is updated from the words that contain the merged pair only
//! (pair -> list of word indices), and a max-heap of (count, pair) is refreshed lazily.

use ahash::AHashMap;
use rayon::prelude::*;
use std::collections::hash_map::Entry;
use std::collections::BinaryHeap;

pub type Pair = u64;

#[inline(always)]
pub fn pair(a: u32, b: u32) -> Pair {
    ((a as u64) << 32) | b as u64
}

#[inline(always)]
pub fn unpair(p: Pair) -> (u32, u32) {
    ((p >> 32) as u32, p as u32)
}

/// Unique words in one flat id buffer: word `w` is `ids[meta[w].start..][..meta[w].len]`.
#[derive(Default)]
pub struct Words {
    ids: Vec<u32>,
    meta: Vec<WordMeta>,
}

/// Kept together so one cache line serves a word's visit.
#[derive(Clone, Copy)]
struct WordMeta {
    start: usize,
    len: u32,
    count: i64,
}

impl Words {
    pub fn with_capacity(words: usize, bytes: usize) -> Words {
        Words { ids: Vec::with_capacity(bytes), meta: Vec::with_capacity(words) }
    }

    /// Add a word (its bytes) seen `count` times. Words shorter than 2 bytes hold no pair: skipped.
    pub fn push(&mut self, bytes: &[u8], count: u64) {
        if bytes.len() < 2 {
            return;
        }
        self.meta.push(WordMeta { start: self.ids.len(), len: bytes.len() as u32, count: count as i64 });
        self.ids.extend(bytes.iter().map(|&b| b as u32));
    }

    pub fn num_words(&self) -> usize {
        self.meta.len()
    }

    #[inline(always)]
    fn get(&self, w: usize) -> &[u32] {
        let m = self.meta[w];
        &self.ids[m.start..m.start + m.len as usize]
    }
}

struct PairStat {
    count: i64,
    /// Words where the pair occurs or once occurred (stale entries are harmless), ascending.
    words: Vec<u32>,
}

/// Heap key: highest count first, then the smallest pair.
#[inline(always)]
fn heap_key(count: i64, p: Pair) -> u128 {
    ((count as u128) << 64) | (!p) as u128
}

/// Runs `num_merges` merges. On success returns the merges in order (merge i creates token 256+i);
/// if the words run out of pairs first, returns Err(number of merges that were possible).
pub fn train(mut words: Words, num_merges: usize) -> Result<Vec<(u32, u32)>, usize> {
    let t0 = std::time::Instant::now();
    let mut pairs = initial_pairs(&words);
    let mut heap: BinaryHeap<u128> = pairs.iter().map(|(&p, s)| heap_key(s.count, p)).collect();
    if std::env::var_os("RUSTBPE_LOG").is_some() {
        eprintln!(
            "rustbpe: {} words, {} pairs, initial counts {:.3}s",
            words.num_words(),
            pairs.len(),
            t0.elapsed().as_secs_f64()
        );
    }
    let mut merges = Vec::with_capacity(num_merges);
    let mut fresh: AHashMap<Pair, PairStat> = AHashMap::new();
    // Steps over fewer words than this stay on one thread (env override for tests).
    let parallel_min_words = match std::env::var("RUSTBPE_PARALLEL_MIN_WORDS") {
        Ok(v) => v.parse().unwrap_or(PARALLEL_MIN_WORDS),
        Err(_) => PARALLEL_MIN_WORDS,
    };
    let parallel = rayon::current_num_threads() > 1;

    while merges.len() < num_merges {
        let Some(top) = heap.pop() else { break };
        let p = !(top as u64);
        let count = (top >> 64) as i64;
        let current = pairs.get(&p).map_or(0, |s| s.count);
        if current != count {
            // Stale entry (the count only ever goes down after a pair is first pushed).
            if current > 0 {
                heap.push(heap_key(current, p));
            }
            continue;
        }
        let stat = pairs.remove(&p).expect("pair present");
        let (a, b) = unpair(p);
        let job = Merge { a, b, new_id: 256 + merges.len() as u32 };
        if parallel && stat.words.len() >= parallel_min_words {
            merge_parallel(&mut words, &stat.words, job, &mut pairs, &mut fresh);
        } else {
            let (ids, meta) = (SharedMut(words.ids.as_mut_ptr()), SharedMut(words.meta.as_mut_ptr()));
            // SAFETY: `stat.words` lists each word once; `words` is not otherwise used meanwhile.
            unsafe {
                merge_list(ids, meta, &stat.words, job, &mut |q, d| decrement(&mut pairs, q, d), &mut fresh)
            };
        }
        // Pairs with the new token only ever gain occurrences now: push each once.
        for (q, s) in fresh.drain() {
            if s.count > 0 {
                heap.push(heap_key(s.count, q));
                pairs.insert(q, s);
            }
        }
        merges.push((a, b));
    }
    if merges.len() < num_merges {
        return Err(merges.len());
    }
    Ok(merges)
}

/// Below this many words, a merge step is not worth splitting across threads.
const PARALLEL_MIN_WORDS: usize = 2048;

#[derive(Clone, Copy)]
struct Merge {
    a: u32,
    b: u32,
    new_id: u32,
}

/// A raw pointer the merge threads share; each thread writes only the words of its own sublist.
#[derive(Clone, Copy)]
struct SharedMut<T>(*mut T);
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

/// Hint the CPU to fetch a word's ids ahead of use (the visits are memory-bound).
#[inline(always)]
fn prefetch(p: *const u32) {
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_prefetch(p as *const i8, std::arch::x86_64::_MM_HINT_T0)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

fn decrement(pairs: &mut AHashMap<Pair, PairStat>, q: Pair, delta: i64) {
    match pairs.entry(q) {
        Entry::Occupied(mut e) => {
            e.get_mut().count += delta;
            if e.get().count == 0 {
                e.remove(); // gone for good: only pairs with a new token can appear
            }
        }
        Entry::Vacant(_) => unreachable!("pair {q:x} occurs but has no count"),
    }
}

/// Apply `job` to every word of `list`.
/// SAFETY: no word may appear twice in `list`, and nothing else may touch these words meanwhile.
unsafe fn merge_list(
    ids: SharedMut<u32>,
    meta: SharedMut<WordMeta>,
    list: &[u32],
    job: Merge,
    on_old: &mut impl FnMut(Pair, i64),
    fresh: &mut AHashMap<Pair, PairStat>,
) {
    const AHEAD: usize = 8;
    for (i, &w) in list.iter().enumerate() {
        if let Some(&next) = list.get(i + AHEAD) {
            prefetch(ids.0.add((*meta.0.add(next as usize)).start));
        }
        let m = &mut *meta.0.add(w as usize);
        let slice = std::slice::from_raw_parts_mut(ids.0.add(m.start), m.len as usize);
        m.len = merge_word(slice, job, w, m.count, on_old, fresh) as u32;
    }
}

/// One big merge step on all threads: each handles a contiguous part of the word list and
/// aggregates its count changes; the parts are then combined in order (lists stay ascending).
fn merge_parallel(
    words: &mut Words,
    list: &[u32],
    job: Merge,
    pairs: &mut AHashMap<Pair, PairStat>,
    fresh: &mut AHashMap<Pair, PairStat>,
) {
    let (ids, meta) = (SharedMut(words.ids.as_mut_ptr()), SharedMut(words.meta.as_mut_ptr()));
    let part = list.len().div_ceil(rayon::current_num_threads() * 4).max(64);
    let parts: Vec<(AHashMap<Pair, i64>, AHashMap<Pair, PairStat>)> = list
        .par_chunks(part)
        .map(|sub| {
            let (mut old, mut new) = (AHashMap::new(), AHashMap::new());
            // SAFETY: the sublists are disjoint and each word appears once in `list`.
            unsafe { merge_list(ids, meta, sub, job, &mut |q, d| *old.entry(q).or_insert(0) += d, &mut new) };
            (old, new)
        })
        .collect();
    for (old, new) in parts {
        for (q, d) in old {
            decrement(pairs, q, d);
        }
        for (q, s) in new {
            match fresh.entry(q) {
                Entry::Occupied(mut e) => {
                    let e = e.get_mut();
                    e.count += s.count;
                    e.words.extend_from_slice(&s.words);
                }
                Entry::Vacant(e) => {
                    e.insert(s);
                }
            }
        }
    }
}

fn initial_pairs(words: &Words) -> AHashMap<Pair, PairStat> {
    let mut pairs: AHashMap<Pair, PairStat> = AHashMap::new();
    for w in 0..words.num_words() {
        let ids = words.get(w);
        let c = words.meta[w].count;
        for win in ids.windows(2) {
            let s = pairs.entry(pair(win[0], win[1])).or_insert(PairStat { count: 0, words: Vec::new() });
            s.count += c;
            if s.words.last() != Some(&(w as u32)) {
                s.words.push(w as u32);
            }
        }
    }
    pairs
}

/// Replace occurrences of (a, b) in `ids` by `new_id` in place; returns the new length.
/// Each occurrence changes pair counts by `c`: old pairs through `on_old`, pairs with the new
/// token in `fresh`.
#[inline(always)]
fn merge_word(
    ids: &mut [u32],
    job: Merge,
    w: u32,
    c: i64,
    on_old: &mut impl FnMut(Pair, i64),
    fresh: &mut AHashMap<Pair, PairStat>,
) -> usize {
    let Merge { a, b, new_id } = job;
    let merged = pair(a, b);
    let mut remove = |q: Pair, fresh: &mut AHashMap<Pair, PairStat>| {
        if q == merged {
            return;
        }
        let (x, y) = unpair(q);
        if x == new_id || y == new_id {
            fresh.get_mut(&q).expect("fresh pair").count -= c;
        } else {
            on_old(q, -c);
        }
    };
    let add = |q: Pair, fresh: &mut AHashMap<Pair, PairStat>| {
        let s = fresh.entry(q).or_insert(PairStat { count: 0, words: Vec::new() });
        s.count += c;
        if s.words.last() != Some(&w) {
            s.words.push(w);
        }
    };
    let n = ids.len();
    let (mut r, mut out) = (0, 0);
    while r < n {
        if r + 1 < n && ids[r] == a && ids[r + 1] == b {
            if out > 0 {
                let x = ids[out - 1];
                remove(pair(x, a), fresh);
                add(pair(x, new_id), fresh);
            }
            if r + 2 < n {
                let y = ids[r + 2];
                remove(pair(b, y), fresh);
                add(pair(new_id, y), fresh);
            }
            ids[out] = new_id;
            r += 2;
        } else {
            ids[out] = ids[r];
            r += 1;
        }
        out += 1;
    }
    out
}

/// Token bytes of every id, given the merges (ids 0..255 are the bytes themselves).
pub fn token_bytes(merges: &[(u32, u32)]) -> Vec<Vec<u8>> {
    let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    for &(a, b) in merges {
        let mut t = tokens[a as usize].clone();
        t.extend_from_slice(&tokens[b as usize]);
        tokens.push(t);
    }
    tokens
}

/// Reference BPE encoding of one chunk: repeatedly merge the lowest-ranked pair present.
pub fn encode_chunk(chunk: &[u8], ranks: &AHashMap<Pair, u32>, out: &mut Vec<u32>) {
    let mut ids: Vec<u32> = chunk.iter().map(|&b| b as u32).collect();
    while ids.len() >= 2 {
        let best =
            ids.windows(2).filter_map(|w| ranks.get(&pair(w[0], w[1])).map(|&r| (r, w[0], w[1]))).min();
        let Some((new_id, a, b)) = best else { break };
        let (mut r, mut o) = (0, 0);
        while r < ids.len() {
            if r + 1 < ids.len() && ids[r] == a && ids[r + 1] == b {
                ids[o] = new_id;
                r += 2;
            } else {
                ids[o] = ids[r];
                r += 1;
            }
            o += 1;
        }
        ids.truncate(o);
    }
    out.extend_from_slice(&ids);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tie_break_and_overlap() {
        let mut w = Words::default();
        w.push(b"aaaa", 1); // (a,a) x3
        w.push(b"bcbc", 1); // (b,c) x2, (c,b) x1
        let m = train(w, 3).unwrap();
        assert_eq!(m[0], (b'a' as u32, b'a' as u32));
        // after: "AA" has (A,A)=1; (b,c)=2 wins next
        assert_eq!(m[1], (b'b' as u32, b'c' as u32));
        // then (256,256) = 1 and (257,257) = 1: smallest pair first
        assert_eq!(m[2], (256, 256));
    }

    #[test]
    fn runs_out_of_pairs() {
        let mut w = Words::default();
        w.push(b"ab", 5);
        assert_eq!(train(w, 2), Err(1));
    }
}
