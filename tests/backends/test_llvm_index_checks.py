"""Out-of-range indices into an embedding table: the reference backend raises, and so do the
llvm backend and a loaded artifact (the generated code itself never reads outside the table)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import kiln


class Lookup(nn.Module):
    def __init__(self, via: str) -> None:
        super().__init__()
        self.table = nn.Embedding(50, 8)
        self.via = via

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.via == "reshape":
            ids = ids.reshape(-1)
        elif self.via == "cast":
            ids = ids.long()
        return self.table(ids).relu()


@pytest.mark.parametrize("via", ["direct", "reshape", "cast"])
def test_out_of_range_ids_raise_on_llvm_and_after_load(via, tmp_path) -> None:
    torch.manual_seed(0)
    model = Lookup(via).eval()
    dtype = torch.int32 if via == "cast" else torch.int64
    ids = torch.randint(0, 50, (2, 6), dtype=dtype)
    compiled = kiln.compile(model, (ids,))
    loaded = kiln.load(kiln.export(compiled, tmp_path / "m.kiln"))
    with torch.no_grad():
        want = model(ids).numpy()
    for bad_id in (50, 10**6, -1):
        bad = ids.clone()
        bad[1, 2] = bad_id
        for run in (compiled, lambda t: loaded(t.numpy()),
                    kiln.compile(model, (ids,), backend="reference")):
            with pytest.raises(kiln.KilnError, match="embedding") as info:
                run(bad)
            assert "token ids" in str(info.value)
    # The calls that failed left the model usable.
    np.testing.assert_array_equal(np.asarray(compiled(ids)), want)
    np.testing.assert_array_equal(loaded(ids.numpy()), want)
