"""Wall-clock timing shared by the benchmark tools of this folder (``benchmark.py``,
``benchmark_ops.py``, ``fsla_benchmark.py``); a tool-only helper, not part of the library."""
import time
from typing import Callable, Dict, Hashable, List, Mapping, TypeVar

K = TypeVar('K', bound=Hashable)


def time_rounds(fns: Mapping[K, Callable[[], object]], repeats: int, warmup: int = 0,
                sync: Callable[[], None] = lambda: None,
                rewarm: int = 0, settle: float = 0.0) -> Dict[K, List[float]]:
    """Seconds per call of each function in each of ``repeats`` rounds.

    ``warmup`` untimed rounds come first. Every round calls each function once, in turn, so
    slow spells on a shared machine hit all of them alike and their ratios are taken side by
    side; with one function this is a plain timing loop. ``sync`` runs after every call, inside
    the timing (e.g. ``torch.cuda.synchronize``). ``rewarm`` untimed calls of a function come
    right before each of its timed calls, so that a small problem is timed with its data in
    cache rather than just after a large neighbour in the round evicted it. ``settle`` (seconds)
    keeps making those untimed calls until that much time has passed: on shared 2-core machines a
    call made within ~20 ms of a long all-core neighbour (a large GEMM) runs up to several
    times slower, and one re-warm call does not cover that.

    Examples:
        >>> times = time_rounds({'a': lambda: sum(range(100))}, repeats=3)
        >>> len(times['a'])
        3
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            sync()
    times: Dict[K, List[float]] = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            begin = time.perf_counter()
            calls = 0
            while calls < rewarm or time.perf_counter() - begin < settle:
                fn()
                sync()
                calls += 1
            start = time.perf_counter()
            fn()
            sync()
            times[key].append(time.perf_counter() - start)
    return times
