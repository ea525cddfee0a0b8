"""Traffic routing over a real Repository: canary weights, sticky keys, shadows, versions coming
and going."""

from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest

from edgerun.examples import mlp_onnx
from edgerun.runtime.metrics import Registry
from edgerun.runtime.repository import Repository
from tests.serving import add_version

X = {"x": np.ones((1, 8), np.float32)}


@pytest.fixture
def repo_dir(tmp_path):
    return tmp_path / "models"


def build(root, versions, config):
    for version in versions:
        add_version(root, "mlp", version, mlp_onnx([8, 16, 4], seed=int(version)))
    (root / "mlp" / "config.toml").write_text(config)
    repository = Repository(root, registry=Registry())
    repository.load_all()
    return repository


def routed_version(repository, key=None):
    attributes = {"x-user": key}.get if key is not None else None
    with repository.route("mlp", None, attributes) as routed:
        return routed.version


def sticky(repository, keys):
    return {key: routed_version(repository, key) for key in keys}


def shadow_total(repository, version, shadow, outcome):
    family = repository.registry.family(
        "edgerun_shadow_requests_total", "", "counter",
        ("model", "version", "shadow_version", "outcome"))
    return family.labels("mlp", version, shadow, outcome).value


STICKY = 'version_policy = { all = true }\n[traffic]\nsticky_key = "x-user"\n'


def test_sticky_keys_move_only_to_an_added_or_from_a_removed_version(repo_dir):
    # the split was cumulative: loading version 3 (or dropping 1) shifted every interval, so
    # users pinned to version 2, which stayed, were moved to 1 or 3 mid-experiment
    repository = build(repo_dir, ["1", "2"],
                       STICKY + 'weights = { "1" = 1, "2" = 1, "3" = 1 }\n')
    keys = [f"user-{i}" for i in range(3000)]
    before = sticky(repository, keys)
    add_version(repo_dir, "mlp", "3", mlp_onnx([8, 16, 4], seed=3))
    assert repository.load("mlp") == ["1", "2", "3"]
    after = sticky(repository, keys)
    moved = {(before[k], after[k]) for k in keys if before[k] != after[k]}
    assert moved and {new for _, new in moved} == {"3"}, f"keys moved {moved}"
    shutil.rmtree(repo_dir / "mlp" / "1")
    repository.poll_once()
    assert repository.versions("mlp") == ["2", "3"]
    last = sticky(repository, keys)
    moved = {(after[k], last[k]) for k in keys if after[k] != last[k]}
    assert moved and {old for old, _ in moved} == {"1"}, f"keys moved {moved}"
    repository.close()


def test_sticky_keys_follow_the_weights(repo_dir):
    repository = build(repo_dir, ["1", "2", "10"],
                       STICKY + 'weights = { "1" = 1, "2" = 3, "10" = 6 }\n')
    picks = list(sticky(repository, [f"u{i}" for i in range(6000)]).values())
    shares = {v: picks.count(v) / len(picks) for v in ("1", "2", "10")}
    assert abs(shares["1"] - 0.1) < 0.02 and abs(shares["2"] - 0.3) < 0.03 \
        and abs(shares["10"] - 0.6) < 0.03, shares
    assert sticky(repository, ["u1", "u2"]) == sticky(repository, ["u1", "u2"])
    repository.close()


def test_an_empty_sticky_key_is_split_by_weight_as_no_key(repo_dir):
    # `x-user: ""` (a proxy that always sets the header, a client with no user yet) hashed
    # the empty string: every such caller was pinned to one version, whatever the weights
    repository = build(repo_dir, ["1", "2"], STICKY + 'weights = { "1" = 1, "2" = 1 }\n')
    assert {routed_version(repository, "") for _ in range(200)} == {"1", "2"}
    assert len({routed_version(repository, "alice") for _ in range(20)}) == 1
    repository.close()


def test_a_version_weighted_0_gets_no_traffic_when_another_can_answer(repo_dir):
    # no version had a positive weight, so every request went to the latest: version 2,
    # the very one the config keeps dark
    repository = build(repo_dir, ["1", "2"],
                       'version_policy = { all = true }\n[traffic]\nweights = { "2" = 0 }\n')
    assert {routed_version(repository) for _ in range(50)} == {"1"}
    with repository.route("mlp", "2") as routed:  # still served when named
        assert routed.run(X)["y"].shape == (1, 4)
    repository.close()


def test_shadow_copies_never_fill_the_queue_a_primary_needs(repo_dir):
    # version 2 serves traffic and shadows version 1: the copies of four answered requests
    # filled its queue of 4, and a request routed to 2 got Overloaded (a 503) for them
    repository = build(repo_dir, ["1", "2"],
                       'version_policy = { all = true }\n'
                       '[batching]\nmax_queue_size = 4\nmax_queue_delay_us = 1000000\n'
                       '[traffic]\nweights = { "1" = 1, "2" = 1 }\nshadow = "2"\n')

    def primary_on_1():
        with repository.route("mlp", "1") as routed:
            routed.run(X)

    threads = [threading.Thread(target=primary_on_1) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    shadow = repository.get("mlp", "2")
    assert shadow.batcher.queue_depth > 0, "the copies wait for their batch"
    with repository.route("mlp", "2") as routed:
        assert routed.run(X)["y"].shape == (1, 4)
    deadline = time.monotonic() + 10
    while True:  # each copy is counted once answered or dropped, and lets its version go
        counted = {outcome: shadow_total(repository, "1", "2", outcome)
                   for outcome in ("mismatch", "dropped")}
        if sum(counted.values()) == 4 and shadow.in_flight == 0:
            break
        assert time.monotonic() < deadline, (counted, shadow.in_flight)
        time.sleep(0.01)
    assert counted["dropped"] >= 1, counted
    repository.close()
