"""DistributedDataParallel (gloo, CPU, 2 processes) training a model with rnnfast layers
ends with the parameters one process reaches on the full batch."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import rnnfast

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this build")

STEPS, BATCH, WORLD = 3, 8, 2


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 6, num_layers=2, bidirectional=True)
        self.gru = nn.GRU(12, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        y, _ = self.lstm(x)
        y, _ = self.gru(y)
        return self.head(y)


def data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(STEPS, 7, BATCH, 4, generator=g), torch.randn(STEPS, 7, BATCH, 2, generator=g)


def train(model, xs, ys):
    """SGD on the mean squared error, one step per batch."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in zip(xs, ys):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(rank)  # different weights per rank: DDP must broadcast rank 0's ...
        model = rnnfast.convert(Model(), backend="cpu")
        with torch.no_grad():
            model(data()[0][0])  # ... over weights the cpu backend has already packed and cached
        ddp = nn.parallel.DistributedDataParallel(model)
        xs, ys = data()
        shard = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        train(ddp, xs[:, :, shard], ys[:, :, shard])
        torch.save({k: v.detach() for k, v in model.state_dict().items()}, f"{out}.{rank}")
        # both ranks tear down together: gloo aborted a process ("terminate called without an active
        # exception") in 3 of 50 runs without this barrier, with torch.nn layers too, and in none of 80 with it
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif("cpu" not in rnnfast.available_backends(), reason="rnnfast._C is not built")
def test_ddp_matches_one_process_on_the_full_batch(tmp_path):
    out = str(tmp_path / "params")
    mp.spawn(_worker, args=(str(tmp_path / "init"), out), nprocs=WORLD, join=True)

    torch.manual_seed(0)
    single = Model()  # rank 0's initial weights, as torch.nn layers
    train(single, *data())
    want = single.state_dict()
    for rank in range(WORLD):
        got = torch.load(f"{out}.{rank}")
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-5, msg=lambda m: f"rank {rank} {key}: {m}")
