"""A slow, obviously-correct byte-level BPE trainer: the oracle for rustbpe's merges.

Same rules as rustbpe/src/train.rs:
- split every text with the pattern (Python's `regex` module), count each unique chunk;
- a pair's count = sum over chunks of count(chunk) * occurrences of the pair in it
  (overlapping occurrences, as in "aaa", all count);
- merge the pair with the highest count, ties to the smallest (left, right) pair of ids;
- apply a merge left to right, replacing non-overlapping occurrences.
No incremental bookkeeping: every step recounts everything from scratch.
"""

from collections import Counter

import regex


def count_chunks(texts, pattern):
    return Counter(chunk for text in texts for chunk in regex.findall(pattern, text))


def merge(ids, pair, new_id):
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train(texts, vocab_size, pattern):
    """Returns the merges [(left, right), ...]; merge i creates token 256 + i."""
    if vocab_size < 256:
        raise ValueError("vocab_size must be at least 256")
    words = [(list(chunk.encode("utf-8")), n) for chunk, n in count_chunks(texts, pattern).items()]
    merges = []
    for new_id in range(256, vocab_size):
        stats = Counter()
        for ids, n in words:
            for pair in zip(ids, ids[1:]):
                stats[pair] += n
        if not stats:
            raise ValueError(f"only {new_id} tokens possible")
        best = min(stats, key=lambda p: (-stats[p], p))
        merges.append(best)
        words = [(merge(ids, best, new_id), n) for ids, n in words]
    return merges


def encode(text, merges, pattern):
    """Encode with the merges: in every chunk, apply the earliest merge present until none is."""
    rank = {pair: 256 + i for i, pair in enumerate(merges)}
    out = []
    for chunk in regex.findall(pattern, text):
        ids = list(chunk.encode("utf-8"))
        while len(ids) >= 2:
            pair = min(zip(ids, ids[1:]), key=lambda p: rank.get(p, float("inf")))
            if pair not in rank:
                break
            ids = merge(ids, pair, rank[pair])
        out.extend(ids)
    return out
