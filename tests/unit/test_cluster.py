"""Which Ray cluster a job joins when --address is unset, given, 'auto' or 'local' (no Ray started here:
a listening socket stands for a live cluster's GCS port, a closed port for a dead one)."""

from __future__ import annotations

import socket

import pytest

from alexnet.cluster import ADDRESS_FILE, node_cluster_address, resolve_address
from alexnet.config import UsageError


@pytest.fixture
def live():
    """host:port of a listening socket."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def dead():
    """host:port where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"


@pytest.fixture
def node(tmp_path, monkeypatch):
    """This node's Ray temp dir, empty; no $RAY_ADDRESS. Returns a function writing `ray start`'s address file."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "ray").mkdir()
    return lambda address: (tmp_path / "ray" / ADDRESS_FILE).write_text(address)


def test_nothing_running_starts_a_local_instance_and_auto_refuses(node):
    assert node_cluster_address() is None
    assert resolve_address(None) is None
    assert resolve_address("local") is None
    with pytest.raises(UsageError, match="--address auto: no running Ray cluster"):
        resolve_address("auto")


def test_a_job_drivers_ray_address_is_joined(node, live, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", live)  # what Ray's job supervisor sets for the entrypoint
    assert resolve_address(None) == live and resolve_address("auto") == live
    assert resolve_address("local") is None  # 'local' wins over the environment


def test_the_cluster_ray_start_runs_on_this_node_is_joined(node, live):
    node(live + "\n")
    assert node_cluster_address() == live
    assert resolve_address(None) == live


def test_a_dead_cluster_left_behind_is_reported_and_a_local_instance_started(node, dead, live, monkeypatch):
    node(dead)
    said = []
    assert resolve_address(None, said.append) is None
    assert said == [f"Ray: no cluster answers at {dead} (from the address file of `ray start` on this node); "
                    "ignoring it"]
    with pytest.raises(UsageError, match="auto"):
        resolve_address("auto", said.append)
    monkeypatch.setenv("RAY_ADDRESS", dead)  # a dead $RAY_ADDRESS, a live `ray start`: the live one
    node(live)
    assert resolve_address(None, said.append) == live


def test_an_explicit_address_must_answer(node, live, dead):
    assert resolve_address(live) == live
    with pytest.raises(UsageError, match=f"no Ray cluster answers at --address {dead}"):
        resolve_address(dead)
    assert resolve_address("ray://head:10001") == "ray://head:10001"  # Ray Client: Ray's own checks
