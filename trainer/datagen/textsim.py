"""Text similarity for the filter: words, ROUGE-L, shingles and n-grams.

ROUGE-L is computed exactly as the `rouge-score` package does it without stemming (what
Self-Instruct uses): lower-cased alphanumeric tokens, F1 of the longest common subsequence,
F = 2 * LCS / (len(a) + len(b)). Tokens are Unicode letters and digits (`rouge-score` keeps only
a-z and 0-9, so it sees nothing in non-Latin text; on ASCII text both agree, which a test checks).
The LCS length uses the bit-parallel algorithm of Allison and Dix (1986, in Hyyrö's form): one
Python big-integer step per token of the second text.

`RougeIndex` finds the first kept text at or above a threshold t without comparing with every
kept text, and without missing one (prefix filtering, Chaudhuri et al. 2006): F >= t needs
LCS >= t * (q + d) / 2 for lengths q and d, so d >= t*q/(2-t) and the texts share at least
t*q/(2-t) tokens (with multiplicity). Leaving out the query's most frequent tokens while their
count stays below that, every qualifying text shares one of the remaining (rarer) tokens: only
texts in those tokens' postings are candidates; each is then bounded by its length and its shared
tokens before the LCS is computed.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

_WORD = re.compile(r"[^\W_]+")


def words(text: str) -> list[str]:
    """Lower-cased runs of letters and digits (punctuation, underscores and spaces split)."""
    return _WORD.findall(text.lower())


def lcs_len(a: Sequence[object], b: Sequence[object]) -> int:
    """Length of the longest common subsequence of two token sequences."""
    if not a or not b:
        return 0
    if len(a) > len(b):  # one bit per token of the shorter sequence
        a, b = b, a
    masks: dict[object, int] = {}
    for i, tok in enumerate(a):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        m = masks.get(tok)
        if m is None:
            continue
        u = v & m
        v = ((v + u) | (v & ~m)) & full
    return len(a) - v.bit_count()  # the zero bits


def rouge_l(a: Sequence[str] | str, b: Sequence[str] | str) -> float:
    """ROUGE-L F1 of two texts (or token lists); symmetric; 0.0 when either is empty."""
    ta = words(a) if isinstance(a, str) else a
    tb = words(b) if isinstance(b, str) else b
    if not ta or not tb:
        return 0.0
    return 2.0 * lcs_len(ta, tb) / (len(ta) + len(tb))


class RougeIndex:
    """Kept texts (token lists) and an inverted index, to find the first one whose ROUGE-L F1
    with a new text is at or above a threshold."""

    def __init__(self) -> None:
        self.docs: list[list[str]] = []
        self.counts: list[Counter] = []
        self.keys: list[object] = []
        self._postings: dict[str, list[tuple[int, int]]] = {}

    def __len__(self) -> int:
        return len(self.docs)

    def add(self, tokens: list[str], key: object = None) -> None:
        i = len(self.docs)
        counts = Counter(tokens)
        self.docs.append(tokens)
        self.counts.append(counts)
        self.keys.append(key)
        for tok, n in counts.items():
            self._postings.setdefault(tok, []).append((i, n))

    def most_similar(self, tokens: list[str], threshold: float) -> tuple[float, object] | None:
        """(score, key) of the earliest kept text with ROUGE-L >= threshold, else None."""
        if not tokens or not self.docs:
            return None
        t, q = threshold, len(tokens)
        qc = Counter(tokens)
        need = t * q / (2.0 - t) - 1e-9  # fewest shared tokens of any text reaching t
        # rarest tokens first; leave out the frequent tail while its count stays below `need`
        order = sorted(qc, key=lambda tok: len(self._postings.get(tok, ())))
        tail = 0
        while order and tail + qc[order[-1]] < need:
            tail += qc[order.pop()]
        prefix: dict[int, int] = {}  # candidate -> tokens shared among the rare ones
        for tok in order:
            n = qc[tok]
            for i, m in self._postings.get(tok, ()):
                prefix[i] = prefix.get(i, 0) + min(n, m)
        lo, hi = need, q * (2.0 - t) / t + 1e-9
        for i in sorted(prefix):
            d = len(self.docs[i])
            bound = t * (q + d) - 1e-9  # 2 * LCS must reach it; LCS <= shared tokens
            if not lo <= d <= hi or 2.0 * (prefix[i] + tail) < bound:
                continue
            dc = self.counts[i]
            if 2.0 * sum(min(n, dc[tok]) for tok, n in qc.items() if tok in dc) < bound:
                continue
            score = 2.0 * lcs_len(tokens, self.docs[i]) / (q + d)
            if score >= t:
                return score, self.keys[i]
        return None


def shingles(tokens: Sequence[str], k: int) -> set[str]:
    """Word k-shingles (the whole text as one shingle when it is shorter than k)."""
    if len(tokens) < k:
        return {" ".join(tokens)} if tokens else set()
    return {" ".join(tokens[i:i + k]) for i in range(len(tokens) - k + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def ngrams(tokens: Sequence[str], n: int) -> Iterable[tuple[str, ...]]:
    return (tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
