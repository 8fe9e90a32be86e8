#!/usr/bin/env python3
"""Interpolated modified Kneser-Ney n-gram baseline (Chen & Goodman 1998) on the token shards
`mamba-lm prepare` writes: trained on DIR/train.bin, scored on DIR/val.bin, in the same tokens
(nats per token) as `mamba-lm train`'s validation loss.

    python3 scripts/ngram_baseline.py DIR [--order 5] [--json]

The highest order uses raw counts, the lower orders continuation counts (the number of distinct
tokens seen before the n-gram), each with three discounts from its counts of counts; the unigram
level interpolates with the uniform distribution over the vocabulary, so no token has
probability 0. A history never seen in training falls through to the next lower order."""
import argparse
import array
import json
import math
import os
import sys
from collections import Counter, defaultdict


def discounts(counts):
    n = Counter(c for c in counts.values() if c <= 4)
    y = n[1] / (n[1] + 2 * n[2])
    return (0.0, 1 - 2 * y * n[2] / n[1], 2 - 3 * y * n[3] / n[2], 3 - 4 * y * n[4] / n[3])


class KneserNey:
    def __init__(self, ids, order, vocab):
        self.order, self.vocab = order, vocab
        top = Counter(tuple(ids[i:i + order]) for i in range(len(ids) - order + 1))
        self.counts = {order: top}
        for k in range(order - 1, 0, -1):
            # Continuation count of a k-gram: distinct tokens seen before it.
            self.counts[k] = Counter(g[1:] for g in self.counts[k + 1])
        self.d, self.hist = {}, {}
        for k, counts in self.counts.items():
            self.d[k] = discounts(counts)
            h = defaultdict(lambda: [0, 0, 0, 0])  # history → [Σ counts, N1, N2, N3+]
            for g, c in counts.items():
                e = h[g[:-1]]
                e[0] += c
                e[min(c, 3)] += 1
            self.hist[k] = dict(h)

    def prob(self, ctx, w):
        p = 1.0 / self.vocab
        for k in range(1, self.order + 1):
            if k > 1 and len(ctx) < k - 1:
                break
            h = tuple(ctx[len(ctx) - (k - 1):]) if k > 1 else ()
            e = self.hist[k].get(h)
            if e is None:
                break  # unseen history: keep the lower order's estimate
            d = self.d[k]
            c = self.counts[k].get(h + (w,), 0)
            gamma = (d[1] * e[1] + d[2] * e[2] + d[3] * e[3]) / e[0]
            p = max(c - d[min(c, 3)], 0.0) / e[0] + gamma * p
        return p


def read_ids(path, dtype):
    ids = array.array("H" if dtype == "u16" else "I")
    with open(path, "rb") as f:
        ids.frombytes(f.read())
    if sys.byteorder == "big":
        ids.byteswap()  # the shards are little-endian
    return ids.tolist()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--order", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    meta = json.load(open(os.path.join(a.data, "meta.json")))
    train, val = (read_ids(os.path.join(a.data, f), meta["dtype"]) for f in ("train.bin", "val.bin"))
    lm = KneserNey(train, a.order, meta["vocab_size"])
    # Every next-token prediction of the validation stream, as the trainer's evaluation scores it.
    nll = -sum(math.log(lm.prob(val[max(0, i - a.order + 1):i], val[i])) for i in range(1, len(val))) / (len(val) - 1)
    r = {"order": a.order, "smoothing": "interpolated modified Kneser-Ney", "val_tokens": len(val) - 1,
         "val_loss": nll, "perplexity": math.exp(nll)}
    print(json.dumps(r) if a.json else f"{a.order}-gram Kneser-Ney: validation loss {nll:.4f} nats/token, perplexity {math.exp(nll):.2f}")


if __name__ == "__main__":
    main()
