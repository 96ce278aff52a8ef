"""Masking strategies as pure functions: numpy in, numpy out, the rng passed in.

`labels` holds the original token where a prediction is required and -100
elsewhere (the ignore index of torch's cross entropy).
"""

from __future__ import annotations

import hashlib

import numpy as np

IGNORE_INDEX = -100


def mask_random(
    ids: np.ndarray,
    maskable: np.ndarray,
    rng: np.random.Generator,
    *,
    rate: float,
    mask_fraction: float,
    random_fraction: float,
    mask_id: int,
    random_ids: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking: each maskable token is selected with probability `rate`; of the
    selected, `mask_fraction` become [MASK], `random_fraction` a random token drawn
    uniformly from `random_ids` (the non-special vocabulary), the rest stay as they are.

    ids: int array of any shape; maskable: bool array, False for special tokens and
    padding (never selected). Returns (input_ids, labels), both int32."""
    ids = np.asarray(ids, np.int32)
    selected = (rng.random(ids.shape) < rate) & maskable
    labels = np.where(selected, ids, IGNORE_INDEX).astype(np.int32)
    action = rng.random(ids.shape)  # one draw per token decides mask / random / keep
    to_mask = selected & (action < mask_fraction)
    to_random = selected & (action >= mask_fraction) & (action < mask_fraction + random_fraction)
    out = ids.copy()
    out[to_mask] = mask_id
    out[to_random] = random_ids[rng.integers(0, len(random_ids), size=int(to_random.sum()))]
    return out, labels


def batch_rng(seed: int, *keys: bytes) -> np.random.Generator:
    """An rng that depends only on the seed and on the batch's content, so the same
    input gives the same masks however the work is split over workers."""
    h = hashlib.blake2b(digest_size=16)
    for k in keys:
        h.update(k)
    words = np.frombuffer(h.digest(), dtype=np.uint32)
    return np.random.default_rng([seed & 0xFFFFFFFF, *words.tolist()])
