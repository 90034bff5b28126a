"""Ragged rows (token ids, logprobs, scores, labels) into one padded tensor: the one padding helper."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_rows(
    rows: Sequence, value, dtype: torch.dtype, device, left: bool = False, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, T] tensor of `rows` padded with `value` to `width` (default: the longest row), and the [N, T]
    bool mask of real entries. `left`: every row ends in the last column (a causal LM's next-token
    position is then the same for all rows). A row may be a list or a tensor; a tensor row keeps its
    gradient (scores the loss is taken of)."""
    width = max(len(r) for r in rows) if width is None else width
    out = torch.full((len(rows), width), value, dtype=dtype, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.bool, device=device)
    for i, row in enumerate(rows):
        n = len(row)
        if not n:
            continue
        cols = slice(width - n, width) if left else slice(0, n)
        out[i, cols] = row if isinstance(row, torch.Tensor) else torch.as_tensor(list(row), dtype=dtype, device=device)
        mask[i, cols] = True
    return out, mask
