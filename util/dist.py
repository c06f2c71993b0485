"""Process-group setup for torchrun (or any launcher that sets RANK/WORLD_SIZE) and the few collectives we use."""
import datetime
import os
import sys
from typing import Any, Callable, Optional, Tuple, TypeVar, Union

import torch
import torch.distributed as dist

T = TypeVar("T")

# Collectives may wait this long: the main process may hash a multi-GB encoder file while the others wait.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)
# Without torchrun, RANK/WORLD_SIZE may be stale leftovers of another job: the other processes get this long.
RENDEZVOUS_TIMEOUT_S = float(os.environ.get("BEYOND_CLS_RENDEZVOUS_TIMEOUT", 120))


class RendezvousError(RuntimeError):
    """The processes named by RANK/WORLD_SIZE did not all join."""


def launch_env() -> Tuple[int, int, int]:
    """(rank, world_size, local_rank) that the launcher put in the environment; (0, 1, 0) without one."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def is_cuda(device: Union[str, torch.device]) -> bool:
    """Whether `device` (a name such as "cuda:1", or a torch.device) is a CUDA device."""
    return str(device).startswith("cuda")


def process_device(device: str) -> str:
    """The device this process uses: any CUDA device becomes cuda:LOCAL_RANK under a launcher (every process on
    one GPU would make NCCL fail with "Duplicate GPU detected"; config.py refuses an explicit index there)."""
    _, world, local_rank = launch_env()
    if world > 1 and is_cuda(device):
        return f"cuda:{local_rank}"
    return device


def init_distributed(device: str) -> None:
    """Join the process group when the environment names one (world size > 1). NCCL on CUDA, gloo otherwise."""
    rank, world, local_rank = launch_env()
    if world <= 1 or dist.is_initialized():
        return
    use_cuda = is_cuda(device)
    if use_cuda:
        torch.cuda.set_device(torch.device(device))
    backend = "nccl" if use_cuda else "gloo"
    if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun: its agent's store already gathered every worker
        dist.init_process_group(backend, init_method="env://", world_size=world, rank=rank,
                                timeout=COLLECTIVE_TIMEOUT)
        return
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise RendezvousError(f"RANK={rank} and WORLD_SIZE={world} are set but {name} is not")
    if rank == 0:
        print(f"waiting up to {RENDEZVOUS_TIMEOUT_S:.0f} s for {world} processes (RANK/WORLD_SIZE are set)",
              file=sys.stderr, flush=True)
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=rank == 0,
                              timeout=datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT_S), wait_for_workers=True)
    except (RuntimeError, OSError) as err:
        raise RendezvousError(f"RANK={rank} and WORLD_SIZE={world} are set but the other processes did not join "
                              f"within {RENDEZVOUS_TIMEOUT_S:.0f} s ({type(err).__name__})") from None
    dist.init_process_group(backend, store=store, world_size=world, rank=rank, timeout=COLLECTIVE_TIMEOUT)


def cleanup_distributed() -> None:
    if is_distributed():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (no-op when not distributed); returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


# What gloo and NCCL say when a peer process went away (exited, crashed, was killed) during a collective: both
# fragments of a pair, so that a network error of some download is never taken for one.
PEER_GONE = (("gloo", "Connection closed by peer"), ("gloo", "Connection reset by peer"),
             ("ncclRemoteError", "remote process exiting"), ("NCCL communicator was aborted", ""))


def peer_failed(err: Optional[BaseException]) -> bool:
    """True if `err` is this process's collective failing because another process went away: that process
    reported (or showed) the cause itself, so this one has nothing to add."""
    if launch_env()[1] <= 1:
        return False
    seen = set()
    while err is not None and id(err) not in seen:  # DDP's reducer and DataLoader re-raise with the cause inside
        seen.add(id(err))
        if any(a in str(err) and b in str(err) for a, b in PEER_GONE):
            return True
        err = err.__cause__ or err.__context__
    return False


def gather_shards(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's rows of a ShardSampler split (rank r holds rows r, r + W, ...), back in dataset order, on
    every process; the input when not distributed. NCCL gathers through this process's GPU."""
    if not is_distributed():
        return tensor
    world = world_size()
    via = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    counts = torch.tensor([len(tensor)], device=via)
    all_counts = [torch.zeros_like(counts) for _ in range(world)]
    dist.all_gather(all_counts, counts)
    all_counts = [int(c) for c in all_counts]
    total = sum(all_counts)
    if all_counts != [len(range(r, total, world)) for r in range(world)]:
        raise ValueError(f"shards of {all_counts} rows are not a ShardSampler split of {total} rows")
    padded = tensor.new_zeros((max(all_counts), *tensor.shape[1:]), device=via)  # all_gather needs equal sizes
    padded[:len(tensor)] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = tensor.new_empty((total, *tensor.shape[1:]))
    for r, (part, count) in enumerate(zip(parts, all_counts)):
        out[r::world] = part[:count].to(out.device)
    return out


def on_main(fn: Callable[..., T], *args: Any, share_result: bool = True) -> Optional[T]:
    """Run fn(*args) on the main process only. Every process then raises the exception fn raised there (so a
    failure on the main process does not leave the others waiting in the next collective), or returns fn's
    result (share_result) or None (not main, and share_result False: for results that cannot be pickled)."""
    outcome = [None, None]
    if is_main():
        try:
            outcome[0] = fn(*args)
        except Exception as err:  # noqa: BLE001 - re-raised below, on every process
            outcome[1] = err
    if is_distributed():
        shared = outcome if share_result else [None, outcome[1]]
        dist.broadcast_object_list(shared, src=0)
        outcome = outcome if is_main() else shared
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]
