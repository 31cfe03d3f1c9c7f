"""Data + model parallelism on torch.distributed, applied from outside to a plain model and classifier.

A run started by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) is one process per rank: NCCL
on CUDA, gloo on CPU. Each rank takes its block of every global batch; the backbone and head run
under DistributedDataParallel (gradients summed, not averaged: every rank's loss is the global loss,
see below); the classifier rows are partitioned by the row store's chunk ownership, features are
all-gathered, and the softmax over all ranks' rows is computed with three all-reduces (Partial FC's
distributed cross-entropy). Host-side objects (batch IDs, decisions taken on rank 0) go through a
gloo group, so no collective waits on the accelerator.

A rank started by torchrun dies with its launcher: :func:`init_world` asks the kernel for SIGKILL when
the parent process (torchrun's agent) exits (``PR_SET_PDEATHSIG``), and exits at once if the parent is
already gone, so a SIGKILL of ``torchrun`` stops every rank within a moment, like a crash: the run
lock goes with the process and the same command resumes from the last checkpoint.
"""
from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .parentdeath import die_with_parent


@dataclass
class World:
    """This process's place in the job: ``rank`` of ``size`` (``size == 1``: no torch.distributed)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    host_group: Any = field(default=None, repr=False)  # gloo group for host tensors and objects

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(group=self.host_group)

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 only and return its result (or raise its exception) on every rank."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
                error = err
        if self.size > 1:
            box = [(result, error)]
            dist.broadcast_object_list(box, src=0, group=self.host_group)
            result, error = box[0]
        if error is not None:
            raise error
        return result

    def gather_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """The global batch's IDs (rank blocks in rank order) from each rank's host int64 IDs."""
        if self.size == 1:
            return ids
        ids = ids.to("cpu", torch.int64).contiguous()
        out = [torch.empty_like(ids) for _ in range(self.size)]
        dist.all_gather(out, ids, group=self.host_group)
        return torch.cat(out)

    def all_min(self, value: float) -> float:
        """The smallest of every rank's ``value`` (a host collective)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.host_group)
        return float(t)


def speaks_for_job() -> bool:
    """This process prints the job's one-line messages: rank 0 of a torchrun job, or a 1-process run
    (read from torchrun's environment, so it holds before the process group exists and after it ends)."""
    return os.environ.get("RANK", "0") == "0"


def die_with_launcher() -> bool:
    """Under torchrun (``TORCHELASTIC_RUN_ID`` set): SIGKILL this process when its parent, the
    launcher's agent, exits; exit now if it already has (re-parented to init). True when requested."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    parent = os.getppid()
    if parent == 1:
        os._exit(1)
    return die_with_parent(parent)


def init_world(device: torch.device, timeout_s: float = 1800.0) -> World:
    """Join the job torchrun started (NCCL on CUDA, gloo on CPU), or a 1-process world without it.
    A rank started by torchrun dies with it (:func:`die_with_launcher`).

    ``timeout_s`` bounds every collective: a rank that dies leaves the others waiting at most that
    long (torchrun's agent usually stops them sooner, when it sees the dead rank)."""
    die_with_launcher()
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    rank, local_rank = dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    host = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    return World(rank=rank, size=dist.get_world_size(), local_rank=local_rank, host_group=host)


def close_world(world: World) -> None:
    """Leave the job: destroy every process group now, while the interpreter is fully alive.

    The caller first drops what holds a group (its DDP wrapper: the reducer keeps the group and the
    Python comm hook alive). A group that outlives this call is torn down by the interpreter's exit,
    where a gloo worker thread that still holds Python-owned tensors must take the GIL and the process
    aborts ("terminate called without an active exception") after a run that finished."""
    if world.size > 1 and dist.is_initialized():
        world.host_group = None
        gc.collect()  # DDP's wrapper and its hooks form reference cycles
        dist.destroy_process_group()


def _sum_allreduce_hook(group, bucket):  # DDP checks the annotations: none, or the real classes
    """DDP communication: sum the ranks' gradients (DDP's default averages them)."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def parallelize(model: nn.Module, world: World, *, sync_bn: bool = False) -> nn.Module:
    """``model`` itself in a 1-process world; else (with SyncBatchNorm if ``sync_bn``) under DDP,
    its gradients summed over ranks. The returned module shares ``model``'s parameters."""
    if world.size == 1:
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device = next(model.parameters()).device
    ddp = nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    ddp.register_comm_hook(None, _sum_allreduce_hook)
    return ddp


class _GatherFeatures(torch.autograd.Function):
    """All-gather rank blocks along dim 0; backward sums every rank's gradient and keeps this rank's
    block (a reduce-scatter; an all-reduce plus slice on gloo, which has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, world_size: int, rank: int) -> torch.Tensor:
        ctx.rank, ctx.rows = rank, z.shape[0]
        parts = [torch.empty_like(z) for _ in range(world_size)]
        dist.all_gather(parts, z.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            out = grad.new_empty((ctx.rows, *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad)
            return out, None, None
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None, None


def gather_features(z: torch.Tensor, world: World) -> torch.Tensor:
    """The global batch's features (rank blocks in rank order), differentiable."""
    return z if world.size == 1 else _GatherFeatures.apply(z, world.size, world.rank)


class _ShardedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of B samples whose classes are split over ranks (columns of ``logits``).

    ``targets[i]`` is the column of sample i's class on this rank, −1 where another rank holds it.
    The max, the sum of exponentials and the target logit are all-reduced in the logits' dtype, so
    every rank returns the same global loss; the gradient of this rank's columns is
    ``(softmax − onehot) / B``.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.detach()
        peak = logits.max(dim=1).values
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        exp = (logits - peak[:, None]).exp_()
        total = exp.sum(dim=1)
        dist.all_reduce(total)
        here = targets >= 0
        target = torch.where(here, logits.gather(1, targets.clamp_min(0)[:, None])[:, 0],
                             torch.zeros_like(peak))
        dist.all_reduce(target)
        ctx.save_for_backward(exp.div_(total[:, None]), targets)
        return (total.log() + peak - target).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        softmax, targets = ctx.saved_tensors
        # −1 at each target held here, −0 (which changes nothing) elsewhere: no nonzero, no sync
        minus_one = -(targets >= 0).to(softmax.dtype)[:, None]
        g = softmax.clone().scatter_add_(1, targets.clamp_min(0)[:, None], minus_one)
        return g * (grad / softmax.shape[0]), None


def sharded_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, world: World) -> torch.Tensor:
    """The cross-entropy over all ranks' classes (``F.cross_entropy`` in a 1-process world)."""
    if world.size == 1:
        return F.cross_entropy(logits, targets)
    return _ShardedCrossEntropy.apply(logits, targets)
