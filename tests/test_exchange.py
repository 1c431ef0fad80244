"""The transport alone, on a real multi-process gloo group."""

import torch

from python_backend.core.exchange import BufferExchange
from python_backend.core.ranks import run_on_ranks


def _shapes(size):
    return [(2, r + 1, 3) for r in range(size)]  # unequal per rank


def _exchange_job(ranks):
    import torch.distributed as dist

    exchange = BufferExchange(dist.group.WORLD, ranks.rank, ranks.world_size)
    mine = torch.full(_shapes(ranks.world_size)[ranks.rank], float(ranks.rank))
    blocking = exchange.gather("a", mine, _shapes(ranks.world_size))
    exchange.step = 1
    exchange.start("b", mine * 10, _shapes(ranks.world_size))
    exchange.flush()
    exchange.step = 2
    delayed = exchange.latest("b")
    again = exchange.latest("b")  # already complete: no second wait
    exchange.step = 3
    size = ranks.world_size
    exchange.start("c", mine + 100, _shapes(size))
    exchange.start("d", torch.full((1, ranks.rank + 2), float(ranks.rank), dtype=torch.float64),
                   [(1, r + 2) for r in range(size)])
    exchange.start("e", torch.full((2, 2), -1.0 - ranks.rank), [(2, 2)] * size)
    assert not [e for e in exchange.events if e.key in "cde"], "nothing leaves before flush()"
    exchange.flush()
    exchange.step = 4
    bundled = {k: [t.clone() for t in exchange.latest(k)] for k in "cde"}
    exchange.drain()
    events = [(e.key, e.kind, e.step, e.started_step) for e in exchange.events]
    return [t.clone() for t in blocking], [t.clone() for t in delayed], again is delayed, events, bundled


def test_unequal_gather_blocking_and_async():
    blocking, delayed, cached, events, bundled = run_on_ranks(3, _exchange_job)
    for r in range(3):
        assert blocking[r].shape == (2, r + 1, 3)
        assert torch.all(blocking[r] == r)
        assert torch.all(delayed[r] == 10 * r)
    assert cached
    assert events[:3] == [("a", "blocking", 0, 0), ("b", "started", 1, 1), ("b", "waited", 2, 1)]
    for r in range(3):  # one collective per dtype carried three keys of unequal shapes
        assert torch.all(bundled["c"][r] == 100 + r) and bundled["c"][r].shape == (2, r + 1, 3)
        assert bundled["d"][r].dtype == torch.float64 and bundled["d"][r].shape == (1, r + 2)
        assert torch.all(bundled["e"][r] == -1.0 - r)
    assert sorted((k, kind) for k, kind, *_ in events[3:6]) == [("c", "started"), ("d", "started"), ("e", "started")]


def test_single_rank_needs_no_process_group():
    exchange = BufferExchange(None, 0, 1)
    t = torch.ones(2, 2)
    assert exchange.gather("k", t, [(2, 2)])[0] is not None
    assert exchange.latest("missing") is None
