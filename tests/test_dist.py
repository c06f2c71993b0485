"""util/dist: which failures mean that another process went away (the DDP runs are in test_resume_ddp.py)."""
import pytest

from util.dist import peer_failed

GLOO_CLOSED = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
               "[127.0.0.1]:7307. This is typically caused by a remote worker crashing.")
# torch's own text for NCCL's remote error (in libtorch_cuda.so)
NCCL_REMOTE = "ncclRemoteError: A call failed possibly due to a network error or a remote process exiting prematurely."


@pytest.fixture
def two_processes(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")


def test_a_collective_that_lost_its_peer_is_a_peer_failure(two_processes):
    assert peer_failed(RuntimeError(GLOO_CLOSED))
    assert peer_failed(RuntimeError(NCCL_REMOTE))
    assert peer_failed(RuntimeError("NCCL communicator was aborted on rank 1."))
    try:  # DDP's backward and DataLoader re-raise with the collective's error as the cause
        try:
            raise RuntimeError(GLOO_CLOSED)
        except RuntimeError as err:
            raise RuntimeError("the reducer failed") from err
    except RuntimeError as err:
        assert peer_failed(err)


def test_other_failures_are_not(two_processes, monkeypatch):
    assert not peer_failed(ConnectionResetError(104, "Connection reset by peer"))  # a download, not a peer
    assert not peer_failed(RuntimeError("CUDA out of memory"))
    assert not peer_failed(ValueError("bad value"))
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process has no peers
    assert not peer_failed(RuntimeError(GLOO_CLOSED))
