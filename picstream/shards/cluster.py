"""Distributed `pack` on Dask (the `cluster` extra): shard ranges become tasks that run `pack` in the
workers' processes; the plan's hash pass likewise runs one task per plan list file. Dask because it is pure pip, small, starts a local process cluster in one line, and
its scheduler runs on a laptop, a SLURM allocation (dask-jobqueue) or Kubernetes alike; each task is
`pack` itself, so the output is the same bytes as a single-process pack."""
from __future__ import annotations

from .format import ShardsError
from .pack import PackSummary, pack


def _pack_range(bounds: tuple[int, int], out: str, storage_options: dict | None) -> PackSummary:
    return pack(out, range(*bounds), storage_options=storage_options)


def pack_on_dask(out: str, shards: range, client, *, per_task: int = 1,
                 storage_options: dict | None = None) -> PackSummary:
    """Pack `shards` of OUT's plan as Dask tasks of `per_task` shards on `client` (a
    `distributed.Client`); a task's ShardsError is raised here."""
    tasks = [(a, min(a + per_task, shards.stop)) for a in range(shards.start, shards.stop, per_task)]
    futures = client.map(_pack_range, tasks, out=out, storage_options=storage_options, pure=False)
    done = client.gather(futures)
    return PackSummary(sum(d.packed for d in done), sum(d.resumed for d in done))


def hash_on_dask(names: list[str], out: str, client, storage_options: dict | None = None) -> None:
    """The plan's hash pass (hygiene.py) as Dask tasks, one per plan list file."""
    from .hashing import hash_file
    client.gather(client.map(hash_file, names, out=out, storage_options=storage_options, pure=False))


def dask_client(address: str):
    """A Client of the scheduler at `address`, or of a local cluster of N processes for `local:N` (the
    client owns it: closing the client closes it)."""
    try:
        from distributed import Client
    except ImportError:
        raise ShardsError("--dask needs the `cluster` extra: pip install 'picstream[cluster]'") from None
    if address.startswith("local:"):
        try:
            n = int(address[len("local:"):])
        except ValueError:
            n = 0
        if n < 1:
            raise ShardsError(f"--dask local:N needs N >= 1 worker processes, got {address!r}")
        return Client(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)
    return Client(address)
