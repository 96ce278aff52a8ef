"""Token streams -> fixed-length sequences, packed across documents.

Layout of one batch of documents d1..dn:
    stream   = d1 [SEP] d2 [SEP] ... dn [SEP]
    sequence = [CLS] stream[k*(L-2) : (k+1)*(L-2)] [SEP]  [PAD]...
Only the last sequence of a batch can be short; `num_tokens` counts the real tokens
(padding is everything after them). `unpack` inverts `pack` exactly.
"""

from __future__ import annotations

import numpy as np


def pack(docs: list[np.ndarray], seq_len: int, cls_id: int, sep_id: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns ids [n, seq_len] int32 and num_tokens [n] int32."""
    if seq_len < 3:
        raise ValueError("seq_len must leave room for [CLS], one token and [SEP]")
    docs = [d for d in docs if len(d)]
    if not docs:
        return np.zeros((0, seq_len), np.int32), np.zeros((0,), np.int32)
    sep = np.array([sep_id], np.int32)
    stream = np.concatenate([part for d in docs for part in (np.asarray(d, np.int32), sep)])
    body = seq_len - 2
    n = -(-len(stream) // body)
    tail = len(stream) - (n - 1) * body  # real stream tokens in the last sequence
    ids = np.full((n, seq_len), pad_id, np.int32)
    ids[:, 0] = cls_id
    padded = np.full(n * body, pad_id, np.int32)
    padded[: len(stream)] = stream
    ids[:, 1 : 1 + body] = padded.reshape(n, body)
    ids[:-1, seq_len - 1] = sep_id
    ids[-1, 1 + tail] = sep_id
    num_tokens = np.full(n, seq_len, np.int32)
    num_tokens[-1] = tail + 2
    return ids, num_tokens


def unpack(ids: np.ndarray, num_tokens: np.ndarray, sep_id: int) -> list[np.ndarray]:
    """The documents of a packed batch, in order."""
    if len(ids) == 0:
        return []
    stream = np.concatenate([row[1 : n - 1] for row, n in zip(ids, num_tokens)])
    cuts = np.flatnonzero(stream == sep_id)
    docs, start = [], 0
    for c in cuts:
        docs.append(stream[start:c])
        start = c + 1
    return docs


def pad_documents(docs: list[np.ndarray], seq_len: int, cls_id: int, sep_id: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The alternative to packing: one document per sequence ([CLS] doc [SEP] [PAD]...),
    a document longer than seq_len - 2 continued in further sequences; rows sorted by
    length (stable), so neighbouring rows form length bins and a batch can be trimmed
    to its longest row. Returns ids [n, seq_len] int32 and num_tokens [n] int32."""
    if seq_len < 3:
        raise ValueError("seq_len must leave room for [CLS], one token and [SEP]")
    body = seq_len - 2
    pieces = [np.asarray(d[i : i + body], np.int32) for d in docs if len(d) for i in range(0, len(d), body)]
    ids = np.full((len(pieces), seq_len), pad_id, np.int32)
    num_tokens = np.zeros(len(pieces), np.int32)
    for row, piece in enumerate(pieces):
        ids[row, 0] = cls_id
        ids[row, 1 : 1 + len(piece)] = piece
        ids[row, 1 + len(piece)] = sep_id
        num_tokens[row] = len(piece) + 2
    order = np.argsort(num_tokens, kind="stable")
    return ids[order], num_tokens[order]
