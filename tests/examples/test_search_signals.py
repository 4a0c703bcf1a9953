"""examples/search.py's harder task: synthetic 1-D signals (generated, seeded) and the 1-D CNN
that kiln.search compresses on them (int8 1-d convolutions, batch-norm re-estimation)."""

from __future__ import annotations

import torch

import kiln
from kiln.examples.search import SIGNAL_CLASSES, signal_cnn_module, signal_data


def test_signal_data_is_seeded_and_balanced():
    a = signal_data(seed=3, train=400, test=100)
    b = signal_data(seed=3, train=400, test=100)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    x_train, x_test, y_train, y_test = a
    assert x_train.shape == (400, 3, 128) and x_test.shape == (100, 3, 128)
    counts = torch.bincount(y_train, minlength=SIGNAL_CLASSES)
    assert counts.min() >= 20   # every class present in a 400-sample draw
    assert not torch.equal(signal_data(seed=4, train=400, test=100)[0], x_train)


def test_signal_cnn_compiles_to_int8_convolutions():
    torch.manual_seed(0)
    model = signal_cnn_module().eval()
    x_train, x_test, _, _ = signal_data(train=256, test=8)
    c = kiln.compile(model, (x_test,), data=x_train, quantize=True)
    precisions = {name: p for name, (p, _) in c.compression.layers.items()}
    assert sum(p == "int8" for p in precisions.values()) == 5   # 4 Conv1d + the head
    with torch.no_grad():
        want = model(x_test)
    assert (c(x_test) - want).abs().max() <= 0.05 * want.abs().max()
