"""Pack documents into token streams and cut them into deterministic, resumable batches.

Stream format: every document is preceded by the end-of-text token, `EOT d0 EOT d1 ...`,
so each document start (the first included) is conditioned on EOT, the same context a
generation from an empty prompt starts from.

Validation split: the last `val_fraction` of EACH document's tokens, so every document
(every play) contributes to both splits and the split needs no RNG.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from septet.data.corpus import corpus_fingerprint
from septet.errors import CheckpointError, ConfigError, DataError
from septet.fileio import atomic_dir
from septet.tokenizer import Tokenizer

_PACK_FORMAT = 1  # bump when the stream layout changes, so old caches are not reused


@dataclass
class PackedCorpus:
    train: np.ndarray
    val: np.ndarray

    def check(self, seq_len: int, batch_size: int = 1) -> None:
        """Raise DataError unless train fills one batch of windows and val holds one window."""
        for split, tokens, windows in (("training", self.train, batch_size), ("validation", self.val, 1)):
            need = windows * seq_len + 1
            if len(tokens) < need:
                raise DataError(
                    f"the {split} split has {len(tokens)} tokens but seq_len={seq_len}"
                    + (f" x batch_size={batch_size}" if windows > 1 else "")
                    + f" needs at least {need}; use more data, a smaller seq_len"
                    + (" or batch_size" if windows > 1 else " or a larger val_fraction")
                )


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding every id (ids are < vocab_size)."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def pack_documents(docs: Sequence[str], tokenizer: Tokenizer, *, val_fraction: float = 0.05) -> PackedCorpus:
    """Tokenize `docs` (batched) and build the train and validation streams."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(
            f"val_fraction={val_fraction} must be in [0, 1); 0.05 keeps 5% of each document for validation"
        )
    eot = tokenizer.eot_id
    dtype = token_dtype(tokenizer.vocab_size)
    train_parts: list[np.ndarray] = []
    val_parts: list[np.ndarray] = []
    sep = np.array([eot], dtype=dtype)
    for ids in tokenizer.encode_batch(list(docs)):
        arr = np.asarray(ids, dtype=dtype)
        n_val = int(len(arr) * val_fraction)
        cut = len(arr) - n_val
        train_parts += [sep, arr[:cut]]
        if n_val:
            val_parts += [sep, arr[cut:]]
    return PackedCorpus(train=_concat(train_parts, dtype), val=_concat(val_parts, dtype))


def _concat(parts: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def cached_pack(
    docs: Sequence[str],
    tokenizer: Tokenizer,
    cache_dir: str | os.PathLike,
    val_fraction: float = 0.05,
) -> PackedCorpus:
    """`pack_documents`, memoised on disk under `cache_dir/pack-<key>/{train,val}.npy`.

    The key covers the corpus text, the tokenizer JSON, val_fraction and the stream format,
    so any change repacks. Arrays come back memory-mapped read-only.
    """
    h = hashlib.sha256()
    for part in (str(_PACK_FORMAT), corpus_fingerprint(docs), tokenizer.to_json_str(), repr(float(val_fraction))):
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    entry = Path(cache_dir) / f"pack-{h.hexdigest()[:20]}"
    try:
        return PackedCorpus(
            train=np.load(entry / "train.npy", mmap_mode="r", allow_pickle=False),
            val=np.load(entry / "val.npy", mmap_mode="r", allow_pickle=False),
        )
    except (OSError, ValueError):  # missing or damaged cache entry: rebuild it
        pass
    packed = pack_documents(docs, tokenizer, val_fraction=val_fraction)
    with atomic_dir(entry) as tmp:  # both files appear together or not at all
        np.save(tmp / "train.npy", packed.train, allow_pickle=False)
        np.save(tmp / "val.npy", packed.val, allow_pickle=False)
    return packed


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather windows tokens[s : s+seq_len+1] and split them into inputs and next-token targets."""
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    w = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


class PackedBatches:
    """Shuffled, resumable training batches over non-overlapping windows of a token stream.

    Window i is tokens[i*seq_len : i*seq_len + seq_len + 1]. Epoch e visits every window once,
    in the order numpy.random.default_rng([seed, e]).permutation(n_windows); a global batch
    is `batch_size` consecutive windows of it, and an epoch's tail that does not fill a batch
    is skipped. Rank r of `world_size` takes rows [r*b, (r+1)*b), b = batch_size // world_size,
    so any world size sees the same global batches. The position is two integers, which makes
    resume exact and `skip` free.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if tokens.ndim != 1:
            raise DataError(f"PackedBatches needs a 1-D token stream, got shape {tuple(tokens.shape)}")
        if seq_len < 1 or batch_size < 1:
            raise ConfigError(f"seq_len={seq_len} and batch_size={batch_size} must both be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank} must be in [0, world_size={world_size})")
        if batch_size % world_size:
            raise ConfigError(
                f"batch_size={batch_size} is not divisible by world_size={world_size}; "
                "pick a global batch size that is a multiple of the number of processes"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.local_batch_size = batch_size // world_size
        self.n_windows = max(0, (len(tokens) - 1) // seq_len)
        self.batches_per_epoch = self.n_windows // batch_size
        if self.batches_per_epoch == 0:
            raise DataError(
                f"the token stream has {len(tokens)} tokens, {self.n_windows} windows of seq_len={seq_len}; "
                f"one batch of {batch_size} needs {batch_size * seq_len + 1} tokens; "
                "use more data or a smaller seq_len/batch_size"
            )
        self.epoch = 0
        self.batch_in_epoch = 0
        self._perm_epoch = -1
        self._perm = np.zeros(0, dtype=np.int64)

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_windows)
            self._perm_epoch = self.epoch
        return self._perm

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (x, y), int64 of shape (local_batch_size, seq_len); y is x shifted by one."""
        start = self.batch_in_epoch * self.batch_size + self.rank * self.local_batch_size
        rows = self._permutation()[start : start + self.local_batch_size]
        batch = _windows(self.tokens, rows * self.seq_len, self.seq_len)
        self.skip(1)
        return batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def skip(self, n: int) -> None:
        """Advance `n` global batches without reading them (e.g. past a loss spike)."""
        if n < 0:
            raise ValueError(f"skip({n}): n must be >= 0")
        total = self.batch_in_epoch + n
        self.epoch += total // self.batches_per_epoch
        self.batch_in_epoch = total % self.batches_per_epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by state_dict, seed included."""
        try:
            epoch, batch, seed = (int(state[k]) for k in ("epoch", "batch_in_epoch", "seed"))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(
                f"data position {state!r} is malformed ({e}); expected integer epoch, batch_in_epoch and seed"
            ) from e
        if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
            raise CheckpointError(
                f"data position epoch={epoch} batch_in_epoch={batch} does not fit this corpus "
                f"({self.batches_per_epoch} batches per epoch); the data or batch size changed since the checkpoint"
            )
        self.epoch, self.batch_in_epoch, self.seed = epoch, batch, seed
        self._perm_epoch = -1


def iter_eval_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Validation batches in stream order, no shuffling; the last batch may be smaller."""
    if seq_len < 1 or batch_size < 1:
        raise ConfigError(f"seq_len={seq_len} and batch_size={batch_size} must both be >= 1")
    n_windows = max(0, (len(tokens) - 1) // seq_len)
    starts = np.arange(n_windows, dtype=np.int64) * seq_len
    for i, lo in enumerate(range(0, n_windows, batch_size)):
        if max_batches is not None and i >= max_batches:
            return
        yield _windows(tokens, starts[lo : lo + batch_size], seq_len)
