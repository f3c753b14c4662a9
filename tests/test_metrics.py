"""Confusion matrix, IoU, mIoU and pixel accuracy; DDP all-reduce over gloo."""
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from pyseg.metrics import ConfusionMatrix, format_iou_table


def _slow_metrics(preds, targets, n):
    m = np.zeros((n, n), dtype=np.int64)
    for p, t in zip(preds, targets):
        for a, b in zip(t.reshape(-1).tolist(), p.reshape(-1).tolist()):
            if a != 255:
                m[a, b] += 1
    iou = []
    for c in range(n):
        u = m[c].sum() + m[:, c].sum() - m[c, c]
        iou.append(m[c, c] / u if u else float("nan"))
    present = [v for v in iou if not math.isnan(v)]
    return m, iou, sum(present) / len(present), np.trace(m) / m.sum()


def test_confusion_matrix_against_loops():
    g = torch.Generator().manual_seed(0)
    n = 5
    cm = ConfusionMatrix(n)
    preds, targets = [], []
    for _ in range(3):
        t = torch.randint(0, n - 1, (2, 6, 7), generator=g)  # class 4 never labelled...
        t[torch.rand(2, 6, 7, generator=g) < 0.2] = 255
        p = torch.randint(0, n - 2, (2, 6, 7), generator=g)  # ...nor predicted: NaN, left out of the mIoU
        cm.update(p, t)
        preds.append(p)
        targets.append(t)
    m, iou, miou, acc = _slow_metrics(preds, targets, n)
    assert np.array_equal(cm.mat.numpy(), m)
    r = cm.compute()
    assert math.isnan(r["iou"][4]) and np.allclose(r["iou"][:4], iou[:4])
    assert r["miou"] == pytest.approx(miou) and r["pixel_acc"] == pytest.approx(acc)
    assert r["pixels"] == int(m.sum())
    table = format_iou_table(r, ["a", "b", "c", "d", "e"])
    assert "n/a" in table and f"{100 * miou:6.2f}" in table


def test_logits_input_and_perfect_prediction():
    t = torch.randint(0, 3, (2, 4, 4))
    logits = torch.nn.functional.one_hot(t, 3).permute(0, 3, 1, 2).float()
    cm = ConfusionMatrix(3)
    cm.update(logits, t)
    r = cm.compute()
    assert r["miou"] == 1.0 and r["pixel_acc"] == 1.0
    cm.reset()
    assert cm.mat.sum() == 0


def test_predicted_but_absent_class_counts_as_zero():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 2]), torch.tensor([0, 0]))
    r = cm.compute()
    assert r["iou"][2] == 0.0 and math.isnan(r["iou"][1]) and r["miou"] == pytest.approx(0.25)


def test_bad_inputs():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="does not match target shape"):
        cm.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="predictions must be in"):
        cm.update(torch.tensor([3]), torch.tensor([0]))
    with pytest.raises(ValueError, match="logits have 4 channels"):
        cm.update(torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="num_classes must be"):
        ConfusionMatrix(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(100 + rank)
        cm = ConfusionMatrix(4)
        cm.update(torch.randint(0, 4, (50,), generator=g), torch.randint(0, 4, (50,), generator=g))
        local = cm.mat.clone()
        r = cm.compute()
        q.put((rank, local.tolist(), cm.mat.tolist(), r["miou"]))  # plain lists: no shared-memory handles
    finally:
        torch.distributed.destroy_process_group()


def test_all_reduce_under_gloo():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    out = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    out.sort(key=lambda o: o[0])
    total = (torch.tensor(out[0][1]) + torch.tensor(out[1][1])).tolist()
    assert out[0][2] == total and out[1][2] == total
    assert out[0][1] != total
    assert out[0][3] == out[1][3]
