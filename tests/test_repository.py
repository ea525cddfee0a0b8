"""Repository rules in-process: version policies, config errors, routing, draining."""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from edgerun.examples import mlp_onnx
from edgerun.runtime import BundleError, EdgerunError, ModelNotFound, ModelNotReady
from edgerun.runtime.metrics import Registry
from edgerun.runtime.model_config import ModelConfig, VersionPolicy
from edgerun.runtime.repository import LOADING, READY, UNAVAILABLE, UNLOADED, Repository
from edgerun.runtime.sources import FolderSource
from tests.fleet_sim import wait_for
from tests.serving import add_version


@pytest.mark.parametrize("policy, expected", [
    (VersionPolicy(), ["10"]),
    (VersionPolicy(latest=2), ["2", "10"]),
    (VersionPolicy(all=True), ["1", "2", "10"]),
    (VersionPolicy(specific=("1", "10")), ["1", "10"]),
])
def test_version_policies_order_versions_numerically(policy, expected):
    assert policy.select(["10", "2", "1"]) == expected


def test_semver_pre_releases_and_build_metadata_order_as_semver_says():
    # rc.10 after rc.9 (numbers as numbers); "+build-7" is metadata, not a pre-release
    versions = ["1.0.0", "1.0.0-rc.10", "1.0.0-rc.9", "1.0.0-alpha", "0.9.0+build-7"]
    assert VersionPolicy(all=True).select(versions) == [
        "0.9.0+build-7", "1.0.0-alpha", "1.0.0-rc.9", "1.0.0-rc.10", "1.0.0"]
    assert VersionPolicy().select(["1.0.0-rc.9", "1.0.0-rc.10"]) == ["1.0.0-rc.10"]
    assert VersionPolicy().select(["1.0.0-rc.1", "1.0.0+build-7"]) == ["1.0.0+build-7"]


@pytest.mark.parametrize("text, message", [
    ("instances = 0", "instances must be >= 1"),
    ("colour = 'red'", "unknown key colour"),
    ("[batching]\nmax_batch = 3", "unknown key batching.max_batch"),
    # a quoted key's newline split the message over two lines: it is shown escaped
    ('"a\\nb" = 1', r"unknown key 'a\\nb'; allowed"),
    ('[batching]\n"max\\rbatch" = 3', r"unknown key batching.'max\\rbatch'; allowed"),
    ("version_policy = { latest = 1, all = true }", "one of latest, specific or all"),
    ("[batching]\nmax_batch_size = 4\npreferred_batch_sizes = [8]", "preferred_batch_sizes"),
    ("[traffic]\nweights = { '1' = -1 }", "weights must be finite numbers >= 0"),
    # inf sent every request to the other version, nan was dropped without a word
    ("[traffic]\nweights = { '1' = inf, '2' = 1 }", "weights must be finite numbers >= 0"),
    ("[traffic]\nweights = { '1' = nan }", "weights must be finite numbers >= 0"),
    ("[traffic]\nweights = { '1' = '50' }", "weights must be finite numbers >= 0"),
    ("version_policy = [", "config.toml"),
    # values of the wrong type were coerced: "12" served versions 1 and 2, "false" all
    ("version_policy = { specific = '12' }", "specific must be a list"),
    ("version_policy = { all = 'false' }", "all must be true or false"),
    ("version_policy = { latest = '2' }", "latest must be an integer"),
    ("[traffic]\nweights = [1]", "weights must be a table"),
    ("[traffic]\nsticky_key = 5", "sticky_key must be a string"),
    # an empty list served the newest version; a list for shadow became "['2']", never shadowed
    ("version_policy = { specific = [] }", "specific must name at least one version"),
    ("version_policy = { specific = [['1']] }", "specific must name versions"),
    ("[traffic]\nshadow = ['2']", "shadow must be a version"),
    # names no version folder can have were taken, and silently never matched
    ("version_policy = { specific = ['1', 'v2'] }", "specific names 'v2', which is not a version"),
    ("version_policy = { specific = ['01'] }", "specific names '01', which is not a version"),
    ("[traffic]\nweights = { 'canary' = 10 }", "weights names 'canary', which is not a version"),
    ("[traffic]\nshadow = 'next'", "shadow names 'next', which is not a version"),
    # NaN passed BatchingConfig's comparisons: a lone request then waited forever; inf
    # overflowed the batcher's timer on the first request
    ("[batching]\nmax_queue_delay_us = nan", "batching.max_queue_delay_us must be a finite"),
    ("[batching]\nmax_queue_delay_us = inf", "batching.max_queue_delay_us must be a finite"),
    # 1e17 passed, and the batcher's timed wait overflowed time_t: its thread died at the first
    # request, and every request hung
    ("[batching]\nmax_queue_delay_us = 1e17", r"max_queue_delay_us must be a finite number "
                                              r"from 0 to 60000000 \(a minute\)"),
    ("[batching]\nmax_batch_size = 2.5", "batching.max_batch_size must be an integer"),
    ("[batching]\nmax_batch_size = 0\npreferred_batch_sizes = [4]",
     "preferred_batch_sizes are for a model that batches: max_batch_size 0 says it has no"),
    ("[batching]\nmax_queue_size = true", "batching.max_queue_size must be an integer"),
    # these were refused, but as "'int' object is not iterable" or "invalid literal for int()"
    ("[batching]\npreferred_batch_sizes = 5", "batching.preferred_batch_sizes must be a list"),
    ("instances = 'x'", "instances must be an integer, got 'x'"),
    ("instances = 1.5", "instances must be an integer, got 1.5"),
    ("batching = 5", "batching must be a table"),
    # TOML takes integers past any float: "int too large to convert to float", an
    # OverflowError that `edgerun serve` showed as a traceback
    (f"[batching]\nmax_queue_delay_us = 1{'0' * 400}", "max_queue_delay_us must be a finite"),
    (f"[traffic]\nweights = {{ '1' = 1{'0' * 400} }}", "weights must be finite numbers >= 0"),
    # tomllib parses arrays recursively: a RecursionError
    (f"instances = {'[' * 3000}{']' * 3000}", "arrays or tables nested too deep"),
])
def test_bad_config_is_refused_naming_the_file_and_key(tmp_path, text, message):
    (tmp_path / "config.toml").write_text(text)
    with pytest.raises(BundleError, match=message) as info:
        ModelConfig.load(tmp_path)
    assert "config.toml" in str(info.value)


def test_config_fills_batching_from_the_server_defaults(tmp_path):
    from edgerun.runtime import BatchingConfig

    (tmp_path / "config.toml").write_text("[batching]\nmax_queue_size = 7\n")
    config = ModelConfig.load(tmp_path, BatchingConfig(max_batch_size=16))
    assert (config.batching.max_batch_size, config.batching.max_queue_size) == (16, 7)


@pytest.fixture
def repo_dir(tmp_path):
    root = tmp_path / "models"
    add_version(root, "mlp", "1", mlp_onnx([8, 16, 4], seed=1))
    return root


def test_folder_names_must_match_the_manifest(repo_dir):
    (repo_dir / "mlp" / "1").rename(repo_dir / "mlp" / "5")
    repository = Repository(repo_dir, registry=Registry())
    with pytest.raises(BundleError, match="holds mlp version 1; the folder names mlp version 5"):
        repository.load("mlp")


def test_unknown_model_and_missing_folder(repo_dir, tmp_path):
    repository = Repository(repo_dir, registry=Registry())
    with pytest.raises(ModelNotFound, match="not in the repository"):
        repository.load("ghost")
    with pytest.raises(BundleError, match="does not exist"):
        Repository(tmp_path / "nowhere")


def test_retiring_a_version_waits_for_its_requests(repo_dir):
    repository = Repository(repo_dir, registry=Registry())
    repository.load_all()
    served = repository.get("mlp")
    served.acquire()  # a request routed to version 1 and still running
    add_version(repo_dir, "mlp", "2", mlp_onnx([8, 16, 4], seed=2))
    swapped = threading.Thread(target=repository.load, args=("mlp",))
    swapped.start()
    time.sleep(0.3)
    assert swapped.is_alive(), "the swap waits for the running request"
    assert repository.get("mlp").version == "2", "new requests already reach version 2"
    served.release()
    swapped.join(5)
    assert not swapped.is_alive()
    with repository.route("mlp") as routed:
        routed.run({"x": np.zeros((1, 8), np.float32)})
    assert routed.version == "2"
    repository.close()


def test_a_config_max_batch_size_of_0_serves_a_sequence_model_unbatched(tmp_path):
    # a bare sequence model in a repository has no bundle flag of its own to say so:
    # config.toml says it, as Triton's max_batch_size 0, and its metadata says 0
    from edgerun.adapters.dataplane import DataPlane
    from tests.helpers import centered_onnx

    add_version(tmp_path, "seq", "1", centered_onnx())
    (tmp_path / "seq" / "config.toml").write_text("[batching]\nmax_batch_size = 0\n")
    repository = Repository(tmp_path, registry=Registry())
    repository.load_all()
    served = repository.get("seq")
    assert not served.signature.batchable and not served.model.signature.batchable
    assert DataPlane(repository).model_metadata("seq")["parameters"] == {"max_batch_size": 0}

    async def both():
        return await asyncio.gather(*(served.batcher.predict_async({"x": x}) for x in (
            np.array([1, 2, 3], np.float32), np.array([10, 30], np.float32))))

    first, second = asyncio.run(both())
    np.testing.assert_allclose(first["centered"], [-1, 0, 1])
    np.testing.assert_allclose(second["centered"], [-10, 10])
    repository.close()


def test_config_instances_start_several_sessions_behind_one_queue(repo_dir):
    (repo_dir / "mlp" / "config.toml").write_text("instances = 2\n")
    repository = Repository(repo_dir, "cpu", registry=Registry())
    repository.load_all()
    served = repository.get("mlp")
    assert len(served.models) == 2
    assert served.models[0].backend.session is not served.models[1].backend.session

    async def one():
        with repository.route("mlp") as routed:
            return routed.version, await routed.run_async({"x": np.ones((1, 8), np.float32)})

    async def burst():
        return await asyncio.gather(*(one() for _ in range(200)))

    results = asyncio.run(burst())
    assert {version for version, _ in results} == {"1"} and len(results) == 200
    repository.close()


def test_a_version_that_fails_its_golden_sample_never_goes_live(repo_dir):
    from edgerun.runtime.bundle import GOLDEN, FileEntry, read_manifest, sha256_file, write_manifest

    repository = Repository(repo_dir, registry=Registry())
    repository.load_all()
    folder = add_version(repo_dir, "mlp", "2", mlp_onnx([8, 16, 4], seed=2))
    with np.load(folder / GOLDEN) as golden:
        arrays = dict(golden)
    arrays["output_0"] = arrays["output_0"] + 1.0  # a claim this build does not reproduce
    np.savez(folder / GOLDEN, **arrays)
    manifest = read_manifest(folder)  # re-hashed: the files are intact, only the claim is wrong
    manifest.files[GOLDEN] = FileEntry(sha256_file(folder / GOLDEN),
                                       (folder / GOLDEN).stat().st_size)
    write_manifest(folder, manifest)
    with pytest.raises(BundleError, match="golden check: output 'y' differs"):
        repository.load("mlp")
    (state,) = [s for s in repository.index() if s.version == "2"]
    assert state.state == "UNAVAILABLE" and "golden" in state.reason
    assert repository.get("mlp").version == "1", "version 1 keeps serving"
    repository.close()


def test_a_failed_reload_is_retried_when_its_config_changes_and_keeps_its_reason(repo_dir):
    # the failure was remembered by the files alone: the next config change then raised an
    # empty BundleError("") without trying, and a config that fixed the load was never tried
    repository = Repository(repo_dir, registry=Registry())
    repository.load_all()
    model = repo_dir / "mlp" / "1" / "model.onnx"
    intact = model.read_bytes()
    model.write_bytes(intact[:-1] + bytes([intact[-1] ^ 1]))
    config = repo_dir / "mlp" / "config.toml"
    for delay in (700, 900):  # each change reloads; the served copy stays
        config.write_text(f"[batching]\nmax_queue_delay_us = {delay}\n")
        with pytest.raises(BundleError, match="model.onnx does not match its sha256"):
            repository.load("mlp")
        assert repository.get("mlp").version == "1"
    model.write_bytes(intact)
    config.write_text("[batching]\nmax_queue_delay_us = 1100\n")
    assert repository.load("mlp") == ["1"]
    assert repository.get("mlp").batcher.config.max_queue_delay_us == 1100
    repository.close()


def test_readiness_follows_the_models_it_tried_not_a_fresh_listing(repo_dir):
    # any new folder once made /v2/health/ready a 503 for good, polled or not
    repository = Repository(repo_dir, registry=Registry())
    repository.load_all()
    assert repository.ready
    with pytest.raises(ModelNotFound):
        repository.load("ghost")  # asked for a model the source does not have
    assert repository.ready
    (repo_dir / "incoming").mkdir()  # being copied in, or never meant to be polled
    assert repository.ready
    repository.poll_once()  # no version in it yet: not a model, so nothing is missing
    assert repository.ready
    add_version(repo_dir, "broken", "1", mlp_onnx([8, 16, 4]))
    (repo_dir / "broken" / "1" / "model.onnx").write_bytes(b"not onnx")
    repository.poll_once()  # tried and failed: not ready, as with a failure at start
    assert not repository.ready
    shutil.rmtree(repo_dir / "broken" / "1")  # its versions taken away, its folder left
    repository.poll_once()
    assert repository.ready, "nothing of it to serve: not a model to wait for"
    shutil.rmtree(repo_dir / "broken")
    repository.poll_once()
    assert repository.ready
    repository.unload("mlp")
    assert repository.ready, "an unloaded model is not missing"
    repository.close()



@pytest.mark.parametrize("broken, same_mtime", [("extra/notes.txt", False),
                                                 ("model.onnx", True)])
def test_a_failed_version_is_retried_once_its_files_are_fixed(repo_dir, broken, same_mtime):
    # "nothing changed since it failed" was read from the top level only (a subfolder's mtime
    # stays when a file in it is rewritten) and from mtimes that a coarse filesystem (FAT keeps
    # 2 s steps) shares between a bad write and its same-size fix: the fix was never tried
    import os

    from edgerun.runtime.bundle import FileEntry, read_manifest, sha256_file, write_manifest

    repository = Repository(repo_dir, registry=Registry())
    repository.load_all()
    folder = add_version(repo_dir, "mlp", "2", mlp_onnx([8, 16, 4], seed=2))
    notes = folder / "extra" / "notes.txt"  # a manifest may list files in subfolders
    notes.parent.mkdir()
    notes.write_bytes(b"calibrated on set A")
    manifest = read_manifest(folder)
    manifest.files["extra/notes.txt"] = FileEntry(sha256_file(notes), notes.stat().st_size)
    write_manifest(folder, manifest)
    path = folder / broken
    intact = path.read_bytes()
    path.write_bytes(intact[:-1] + bytes([intact[-1] ^ 1]))  # same size, another sha256
    stamp = path.stat().st_mtime_ns
    repository.poll_once()
    assert repository.get("mlp").version == "1", "the broken version 2 never goes live"
    path.write_bytes(intact)
    if same_mtime:
        os.utime(path, ns=(stamp, stamp))  # the fix landed in the same mtime step
    repository.poll_once()
    assert repository.get("mlp").version == "2", f"the fixed {broken} was never retried"
    repository.close()


def test_a_fix_copied_with_its_old_mtime_is_retried(repo_dir):
    """`rsync -t`, `cp -p` and `tar -x` give a file its source's mtime: a same-size fix
    of a broken file could then look unchanged (size and mtime), and was never retried."""
    repository = Repository(repo_dir, registry=Registry())
    repository.load_all()
    folder = add_version(repo_dir, "mlp", "2", mlp_onnx([8, 16, 4], seed=2))
    path = folder / "model.onnx"
    intact = path.read_bytes()
    old = time.time_ns() - 3600 * 10**9  # the source's mtimes, long settled

    def copied_with_old_mtimes() -> None:
        for file in folder.rglob("*"):
            os.utime(file, ns=(old, old))

    path.write_bytes(intact[:-1] + bytes([intact[-1] ^ 1]))
    copied_with_old_mtimes()
    repository.poll_once()
    assert repository.get("mlp").version == "1", "the broken version 2 never goes live"
    path.write_bytes(intact)
    copied_with_old_mtimes()
    repository.poll_once()
    assert repository.get("mlp").version == "2", "the fix was never retried"
    repository.close()


@pytest.mark.parametrize("reload", ["poll", "load"])
def test_a_version_kept_after_a_failed_reload_takes_its_config_once_fixed(repo_dir, reload):
    # the kept copy still ran the old batching while the model's config said the new one, and
    # neither polling nor a load ever reloaded it once its files were fixed
    repository = Repository(repo_dir, registry=Registry())
    repository.load_all()
    model = repo_dir / "mlp" / "1" / "model.onnx"
    intact = model.read_bytes()
    model.write_bytes(intact[:-1] + bytes([intact[-1] ^ 1]))
    (repo_dir / "mlp" / "config.toml").write_text("[batching]\nmax_queue_delay_us = 900\n")
    with pytest.raises(BundleError, match="model.onnx does not match its sha256"):
        repository.load("mlp")
    assert repository.get("mlp").batcher.config.max_queue_delay_us == 500, "the old copy serves"
    model.write_bytes(intact)
    if reload == "poll":
        repository.poll_once()
    else:
        assert repository.load("mlp") == ["1"]
    assert repository.get("mlp").batcher.config.max_queue_delay_us == 900
    with repository.route("mlp") as routed:
        assert routed.run({"x": np.zeros((1, 8), np.float32)})["y"].shape == (1, 4)
    repository.close()


class HeldSource(FolderSource):
    """A real folder whose `config` of one model, once armed, waits at a gate: a poll pass
    held between listing the models and looking at the next of them. With `after_wanted`,
    it waits once `wanted` has read that model's versions instead."""

    def __init__(self, root, held: str, after_wanted: bool = False) -> None:
        super().__init__(root)
        self.held = held
        self.after_wanted = after_wanted
        self.armed = False
        self.entered, self.gate = threading.Event(), threading.Event()

    def _hold(self, name: str) -> None:
        if self.armed and name == self.held:
            self.armed = False
            self.entered.set()
            assert self.gate.wait(30), "test gate never opened"

    def config(self, name: str) -> ModelConfig:
        if not self.after_wanted:
            self._hold(name)
        return super().config(name)

    def wanted(self, name: str, config: ModelConfig) -> list[str]:
        wanted = super().wanted(name, config)
        if self.after_wanted:
            self._hold(name)
        return wanted


@contextmanager
def poll_held(repository: Repository) -> Iterator[None]:
    """A poll pass under way, held where it looks at the source's held model (its listing
    taken) for the block."""
    source = repository.source
    source.armed = True
    polling = threading.Thread(target=repository.poll_once)
    polling.start()
    assert source.entered.wait(30), "the poll pass never looked at mlp"
    try:
        yield
    finally:
        source.gate.set()
        polling.join(30)


def test_an_unload_during_a_poll_pass_is_not_undone_by_it(repo_dir):
    """POST .../unload answered 200 while a poll pass was under way (looking at other models,
    or loading one): the pass then found the model missing and loaded it again, for good."""
    add_version(repo_dir, "other", "1", mlp_onnx([8, 16, 4], seed=2))
    repository = Repository(HeldSource(repo_dir, held="mlp"), registry=Registry())
    repository.load_all()
    with poll_held(repository):  # the pass looks at mlp, then at other
        repository.unload("other")  # listed by the pass already, not yet looked at
    assert "other" not in repository, "the poll pass undid the unload"
    assert {(s.name, s.state) for s in repository.index()} == {
        ("mlp", "READY"), ("other", UNLOADED)}
    repository.poll_once()  # and no later pass brings it back either
    assert "other" not in repository
    repository.load("other")  # until asked for
    assert repository.versions("other") == ["1"]
    repository.close()


def test_a_model_loaded_during_a_poll_pass_is_not_unloaded_by_it(repo_dir):
    """A model that came after a poll pass listed the source, and was loaded meanwhile (an OTA
    switch's first install of a model, POST .../load): the pass, not having listed it, took
    it for removed and unloaded it; it answered "not loaded" until the next pass."""
    repository = Repository(HeldSource(repo_dir, held="mlp"), registry=Registry())
    repository.load_all()
    with poll_held(repository):
        add_version(repo_dir, "late", "1", mlp_onnx([8, 16, 4], seed=2))  # after the listing
        assert repository.load("late") == ["1"]
    assert "late" in repository, "the poll pass unloaded a model loaded during it"
    assert repository.versions("late") == ["1"]
    shutil.rmtree(repo_dir / "late")  # a model the source no longer offers still goes
    repository.poll_once()
    assert "late" not in repository
    repository.close()


def test_a_model_that_failed_to_load_during_a_poll_pass_keeps_the_server_unready(repo_dir):
    """A model that came after a poll pass listed the source and failed its load meanwhile
    (POST .../load, an OTA switch's first install): the pass, ending, kept only the models it
    had listed as due, so /v2/health/ready said ready with that model not served, and stayed
    so (no later pass retries a known failure)."""
    repository = Repository(HeldSource(repo_dir, held="mlp"), registry=Registry())
    repository.load_all()
    with poll_held(repository):
        folder = add_version(repo_dir, "late", "1", mlp_onnx([8, 16, 4], seed=2))
        (folder / "model.onnx").write_bytes(b"not onnx")
        with pytest.raises(BundleError):
            repository.load("late")
        assert not repository.ready, "a model it tried to serve is not served"
    assert not repository.ready, "the poll pass dropped a model it had not listed"
    repository.poll_once()
    assert not repository.ready
    shutil.rmtree(repo_dir / "late")  # gone from the source: no longer due
    repository.poll_once()
    assert repository.ready
    repository.close()


def test_a_model_that_failed_to_load_while_a_poll_pass_found_it_empty_keeps_it_due(repo_dir):
    """A poll pass read an empty model folder (no version yet: nothing due); its version came
    and its load failed (POST .../load) before the pass acted on what it read: the pass
    crossed the model off, and the server said ready with it not served, for good."""
    (repo_dir / "late").mkdir()
    repository = Repository(HeldSource(repo_dir, held="late", after_wanted=True),
                            registry=Registry())
    repository.load_all()
    with poll_held(repository):  # the pass has read that late has no version
        folder = add_version(repo_dir, "late", "1", mlp_onnx([8, 16, 4], seed=2))
        (folder / "model.onnx").write_bytes(b"not onnx")
        with pytest.raises(BundleError):
            repository.load("late")
    assert not repository.ready, "the poll pass crossed off a model tried since"
    shutil.rmtree(folder)  # its version taken away: no longer due
    repository.poll_once()
    assert repository.ready
    repository.close()


def test_a_load_waiting_behind_an_unload_is_refused_once_close_began(repo_dir):
    """POST .../load (or an OTA switch) waiting for an unload's drain when the server stopped:
    once the lock was free it loaded, after `close` had released every model, and that model's
    sessions and batcher threads were never released. Now it is told the server is stopping."""
    add_version(repo_dir, "other", "1", mlp_onnx([8, 16, 4], seed=2))
    repository = Repository(repo_dir, registry=Registry())
    repository.load_all()
    add_version(repo_dir, "late", "1", mlp_onnx([8, 16, 4], seed=3))
    running = repository.get("other")
    running.acquire()  # a request still running on other: its unload drains, holding the lock
    unloading = threading.Thread(target=repository.unload, args=("other",))
    unloading.start()
    wait_for(lambda: "other" not in repository, 30, "the unload to start draining")
    outcome: list[object] = []

    def load_late() -> None:
        try:
            outcome.append(repository.load("late"))
        except EdgerunError as exc:
            outcome.append(exc)

    loading = threading.Thread(target=load_late)
    loading.start()
    closing = threading.Thread(target=repository.close)
    closing.start()
    wait_for(repository._stop.is_set, 30, "close to begin")
    running.release()
    for thread in (unloading, loading, closing):
        thread.join(60)
        assert not thread.is_alive()
    assert isinstance(outcome[0], ModelNotReady), outcome
    assert "closing" in str(outcome[0]) and "'late'" in str(outcome[0])
    assert "late" not in repository and "mlp" not in repository, "loaded after close"
    with pytest.raises(ModelNotReady, match="stopping"):  # and any load asked for later
        repository.load("mlp")


def test_close_releases_a_model_that_a_load_under_way_adds(repo_dir):
    """`close` listed the models to release before waiting for a load under way (POST
    .../load of a new model): the model that load added was left loaded for good."""
    add_version(repo_dir, "late", "1", mlp_onnx([8, 16, 4], seed=3))
    repository = Repository(HeldSource(repo_dir, held="late"), registry=Registry())
    repository.source.armed = True
    loading = threading.Thread(target=repository.load, args=("late",))
    loading.start()
    assert repository.source.entered.wait(30), "the load never began"
    closing = threading.Thread(target=repository.close)
    closing.start()
    wait_for(repository._stop.is_set, 30, "close to begin")
    repository.source.gate.set()
    for thread in (loading, closing):
        thread.join(60)
        assert not thread.is_alive()
    assert "late" not in repository, "close left the model the load added loaded"
    assert {(s.name, s.state) for s in repository.index() if s.name == "late"} == {
        ("late", UNLOADED)}


class ResolvingSource(FolderSource):
    """A real folder whose version folders may be links into a store: each opens where its
    files lie (`resolve(strict=True)`), so a folder gone since `wanted` listed it is an
    OSError from `bundle_path`, which `fingerprint` asks first. The `held` version's
    `bundle_path` waits at a gate on its `held_call`-th call (1: the fingerprint's; 2: the
    open's), once."""

    def __init__(self, root, held: tuple[str, str], held_call: int) -> None:
        super().__init__(root)
        self.held, self.held_call = held, held_call
        self.entered, self.gate = threading.Event(), threading.Event()

    def bundle_path(self, name: str, version: str) -> Path:
        if (name, version) == self.held:
            self.held_call -= 1
            if self.held_call == 0:
                self.entered.set()
                assert self.gate.wait(30), "test gate never opened"
        return (self.root / name / version).resolve(strict=True)


@pytest.mark.parametrize("held_call, state_at_gate", [(1, None), (2, LOADING)],
                         ids=["fingerprint", "open"])
def test_a_version_whose_source_fails_with_an_os_error_is_unavailable_not_loading(
        repo_dir, held_call, state_at_gate):
    """A version is LOADING while its bundle opens; a source that failed there with anything
    but an EdgerunError (an OSError from a folder removed since it was listed) left it
    LOADING for good: a request naming the model or that version answered 503 "is loading"
    forever, and the index said LOADING. Failing so in `fingerprint`, just before, it was
    never marked at all. Either way the model's later versions were never tried. It ends
    UNAVAILABLE with the reason, as any failed load, and is tried again once it is back."""
    add_version(repo_dir, "mlp", "2", mlp_onnx([8, 16, 4], seed=2))
    (repo_dir / "mlp" / "config.toml").write_text("version_policy = { all = true }\n")
    source = ResolvingSource(repo_dir, held=("mlp", "1"), held_call=held_call)
    repository = Repository(source, registry=Registry())
    loading = repository.start_loading()
    assert source.entered.wait(30), "the load never reached version 1"
    assert [s.state for s in repository.index() if s.version == "1"] == \
        [state_at_gate] * (state_at_gate is not None)
    removed = repo_dir / "mlp" / "1"
    shutil.rmtree(removed)  # between listing and opening
    source.gate.set()
    loading.join(60)
    assert not loading.is_alive()
    states = {s.version: s for s in repository.index()}
    assert {v: s.state for v, s in states.items()} == {"1": UNAVAILABLE, "2": READY}
    assert "FileNotFoundError" in states["1"].reason and str(removed) in states["1"].reason
    assert repository.ready and repository.versions("mlp") == ["2"]
    with pytest.raises(ModelNotFound, match="no version '1' loaded"):  # 404, not 503
        repository.route("mlp", "1")
    with repository.route("mlp") as routed:
        assert routed.version == "2"
    add_version(repo_dir, "mlp", "1", mlp_onnx([8, 16, 4], seed=1))  # back: tried again
    repository.poll_once()
    assert repository.versions("mlp") == ["1", "2"]
    assert {s.version: s.state for s in repository.index()} == {"1": READY, "2": READY}
    repository.close()


#: A poll pass whose load waits at its start (counted as loading, about to begin), then a stop
#: as `edgerun serve`'s: close without waiting for loads, then end if one is under way.
POLL_HELD_AT_ITS_LOAD = """
import sys, threading
from edgerun.examples import mlp_onnx
from edgerun.runtime.metrics import Registry
from edgerun.runtime.repository import Repository, exit_if_still_loading
from tests.fleet_sim import wait_for
from tests.serving import add_version

class Held(Repository):
    entered, gate = threading.Event(), threading.Event()

    def load(self, name, **options):
        if threading.current_thread().name == "poll":
            self.entered.set()
            self.gate.wait()
        return super().load(name, **options)

repository = Held(sys.argv[1], registry=Registry())
repository.load_all()
add_version(repository.source.root, "late", "1", mlp_onnx([8, 16, 4], seed=2))
threading.Thread(target=repository.poll_once, name="poll", daemon=True).start()
assert repository.entered.wait(30)
print("closed:", repository.close(wait_for_loads=False), flush=True)
exit_if_still_loading(0)
print("exit_if_still_loading returned: the load would run on during shutdown", flush=True)
sys.exit(3)
"""


def test_a_stop_as_the_poll_thread_starts_a_load_ends_the_process_without_it(repo_dir):
    """SIGTERM just as a poll pass began a load (counted as loading, not yet listed as a
    loader): closing left it to run, as it should, but `exit_if_still_loading` did not see
    it, so the process went through the interpreter's shutdown with ONNX Runtime loading
    (the SIGABRT that function exists to avoid)."""
    done = subprocess.run([sys.executable, "-c", POLL_HELD_AT_ITS_LOAD, str(repo_dir)],
                          cwd=Path(__file__).parent.parent, capture_output=True, text=True,
                          timeout=120)
    assert "closed: False" in done.stdout, done.stdout + done.stderr
    assert "returned" not in done.stdout, done.stdout
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_broken_newest_version_under_latest_1_is_reported_once_not_every_poll(repo_dir,
                                                                               caplog):
    # version 1 stays (no wanted version could load), so it was "not wanted" at every poll:
    # each poll reloaded, failed on the known failure and logged it again (every 5 s)
    (repo_dir / "mlp" / "config.toml").write_text("version_policy = { latest = 1 }\n")
    repository = Repository(repo_dir, registry=Registry())
    repository.load_all()
    folder = add_version(repo_dir, "mlp", "2", mlp_onnx([8, 16, 4], seed=2))
    (folder / "model.onnx").write_bytes(b"not onnx")
    for path in folder.rglob("*"):  # settled: written long enough ago to tell changes apart
        os.utime(path, (time.time() - 60, time.time() - 60))
    with caplog.at_level("ERROR", logger="edgerun.runtime.repository"):
        for _ in range(3):
            repository.poll_once()
    assert len(caplog.records) == 1, caplog.text
    assert "version 2" in caplog.records[0].getMessage()
    assert repository.get("mlp").version == "1", "version 1 keeps serving"
    shutil.rmtree(folder)  # the broken one taken away: 1 is the newest and wanted again
    add_version(repo_dir, "mlp", "3", mlp_onnx([8, 16, 4], seed=3))
    repository.poll_once()
    assert repository.get("mlp").version == "3" and repository.versions("mlp") == ["3"]
    repository.close()


@contextmanager
def one_file_descriptor_left() -> Iterator[None]:
    """RLIMIT_NOFILE lowered for the block so that one more file can be open at a time, as
    in a process whose descriptors its connections have nearly all taken; restored after."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest = os.open(os.devnull, os.O_RDONLY)  # the number the next open gets
    os.close(lowest)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest + 1, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_version_that_failed_for_want_of_file_descriptors_is_tried_again_at_the_next_poll(
        repo_dir, tmp_path, monkeypatch):
    """A load that failed as the process ran out of file descriptors (EMFILE) was remembered
    as the version's own failure: polling never tried it again, its files unchanged, until a
    restart, though descriptors were free a moment later. What the process lacked (memory,
    descriptors, disk space) is not what the version is: the next poll tries it again."""
    import tempfile

    repository = Repository(repo_dir, registry=Registry())
    repository.load_all()
    folder = add_version(repo_dir, "mlp", "2", mlp_onnx([8, 16, 4], seed=2))
    settled = time.time() - 60  # written long ago: the same files at every look
    for path in folder.rglob("*"):
        os.utime(path, (settled, settled))
    # the load's temporary folder, which cannot be removed without a second descriptor
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with one_file_descriptor_left():  # the folder is listed, the load needs two at once
        repository.poll_once()
    state = {s.version: s for s in repository.index()}["2"]
    assert state.state == UNAVAILABLE and "Too many open files" in state.reason, state
    assert repository.get("mlp").version == "1", "version 1 keeps serving"
    repository.poll_once()  # descriptors free again, nothing of the version changed
    assert repository.get("mlp").version == "2", "the version was never tried again"
    assert {s.version: s.state for s in repository.index()} == {"1": UNLOADED, "2": READY}
    repository.close()


def _toml(value) -> str:
    """A TOML value (inline), for the property round below."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(_toml, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


_KEYS = st.sampled_from(["version_policy", "batching", "instances", "traffic", "latest",
                         "specific", "all", "max_batch_size", "max_queue_delay_us",
                         "preferred_batch_sizes", "max_queue_size", "weights", "sticky_key",
                         "shadow", "1"]) | st.text(max_size=4)
_VALUES = st.recursive(
    st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.sampled_from([10 ** 400, "1", "2"])
    | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=3),
    max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(document=st.dictionaries(_KEYS, _VALUES, max_size=4))
@example(document={"traffic": {"weights": {"1": 10 ** 400}}})
def test_any_config_toml_loads_or_is_a_bundle_error_naming_the_file(tmp_path_factory, document):
    """config.toml of any keys and values: a config, or BundleError naming the file; never
    another exception (an integer past any float was an OverflowError)."""
    folder = tmp_path_factory.mktemp("config")
    (folder / "config.toml").write_text(
        "".join(f"{json.dumps(key)} = {_toml(value)}\n" for key, value in document.items()))
    try:
        ModelConfig.load(folder)
    except BundleError as exc:
        assert str(exc).startswith(f"{folder / 'config.toml'}: "), exc
