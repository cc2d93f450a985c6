"""storage_uri: a run mirrored beyond the driver's disk (issue 15, item 9).

Real pyarrow filesystems: file:// on this disk, and S3 over HTTP against moto's S3 server run
in this process (no cloud account here; the protocol, the client and its listing and deletes
are the real ones)."""

from __future__ import annotations

import shutil

import pytest

from ddpo_ray.config import build_config
from ddpo_ray.records.run_dir import COMPLETE_MARKER, RunDirectory
from ddpo_ray.records.storage import RunStorage, StorageError
from tests.helpers import SMALL, free_port


def _files(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _fake_run(root, epochs=(0, 1)):
    run_dir = RunDirectory(root)
    run_dir.write_config({"seed": 0})
    for epoch in epochs:
        directory = run_dir.checkpoint_path(epoch)
        directory.mkdir(parents=True)
        (directory / "learner_state.pt").write_bytes(b"state %d" % epoch)
        run_dir.mark_checkpoint_complete(epoch)
    return run_dir


@pytest.fixture(scope="module")
def s3_uri(tmp_path_factory):
    """A bucket on moto's S3 server, with credentials in the environment as for any S3 client."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    patch = pytest.MonkeyPatch()
    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_EC2_METADATA_DISABLED": "true"}.items():
        patch.setenv(name, value)
    import pyarrow.fs

    s3 = pyarrow.fs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                                 allow_bucket_creation=True)
    s3.create_dir("runs-bucket")
    yield f"s3://runs-bucket/ddpo?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    patch.undo()
    server.stop()


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_a_push_mirrors_the_run_and_a_pull_restores_it(backend, s3_uri, tmp_path):
    uri = f"file://{tmp_path}/mirror" if backend == "file" else s3_uri
    run_dir = _fake_run(tmp_path / "run")
    storage = RunStorage(uri, "run")
    storage.check()
    assert storage.push(run_dir.root) == 5
    assert storage.push(run_dir.root) == 0  # nothing changed
    shutil.rmtree(run_dir.checkpoint_path(0))  # pruned here (keep_last_n): pruned there too
    (run_dir.root / "metrics.jsonl").write_text('{"epoch": 0}\n')
    assert storage.push(run_dir.root) == 1
    elsewhere = tmp_path / "other-node" / "run"
    assert storage.pull(elsewhere) == 4
    assert _files(elsewhere) == _files(run_dir.root)
    assert RunDirectory(elsewhere).latest_checkpoint() == RunDirectory(elsewhere).checkpoint_path(1)


def test_a_push_cut_short_never_leaves_a_marker_for_a_partial_checkpoint(tmp_path, monkeypatch):
    """A checkpoint being rewritten loses its COMPLETE first; a push that fails part-way leaves
    the mirror with no COMPLETE for it (deleted first, uploaded last), so it is ignored there."""
    run_dir = _fake_run(tmp_path / "run", epochs=(0,))
    storage = RunStorage(f"file://{tmp_path}/mirror", "run")
    storage.push(run_dir.root)
    mirrored = tmp_path / "mirror" / "run" / "checkpoints" / "epoch_0000"
    assert (mirrored / COMPLETE_MARKER).is_file()
    (run_dir.checkpoint_path(0) / COMPLETE_MARKER).unlink()  # the rewrite, as the checkpoint writer does it
    (run_dir.checkpoint_path(0) / "learner_state.pt").write_bytes(b"new state, longer")
    run_dir.mark_checkpoint_complete(0)
    upload = RunStorage._upload

    def failing_upload(self, path, rel, stamp):  # injected: the connection drops mid-push
        if rel.endswith("learner_state.pt"):
            raise OSError("connection reset")
        upload(self, path, rel, stamp)

    monkeypatch.setattr(RunStorage, "_upload", failing_upload)
    with pytest.raises(StorageError, match=r"storage_uri: mirroring to file://.*/mirror/run failed: OSError: connection reset"):
        storage.push(run_dir.root)
    assert not (mirrored / COMPLETE_MARKER).exists()
    monkeypatch.setattr(RunStorage, "_upload", upload)
    storage.push(run_dir.root)
    assert (mirrored / COMPLETE_MARKER).is_file() and (mirrored / "learner_state.pt").read_bytes() == b"new state, longer"


def test_best_json_goes_last_so_it_never_names_weights_the_mirror_lacks(tmp_path, monkeypatch):
    run_dir = _fake_run(tmp_path / "run", epochs=())
    run_dir.best_dir.mkdir(parents=True, exist_ok=True)
    (run_dir.best_dir / "pytorch_lora_weights.safetensors").write_bytes(b"v3 weights")
    (run_dir.best_dir / "best.json").write_text('{"policy_version": 3}')
    storage = RunStorage(f"file://{tmp_path}/mirror", "run")
    storage.push(run_dir.root)
    (run_dir.best_dir / "pytorch_lora_weights.safetensors").write_bytes(b"v7 weights!")
    (run_dir.best_dir / "best.json").write_text('{"policy_version": 7}')
    upload = RunStorage._upload

    def failing_upload(self, path, rel, stamp):
        if rel.endswith(".safetensors"):
            raise OSError("connection reset")
        upload(self, path, rel, stamp)

    monkeypatch.setattr(RunStorage, "_upload", failing_upload)
    with pytest.raises(StorageError):
        storage.push(run_dir.root)
    assert not (tmp_path / "mirror" / "run" / "checkpoints" / "best" / "best.json").exists()
    monkeypatch.setattr(RunStorage, "_upload", upload)
    storage.push(run_dir.root)
    assert (tmp_path / "mirror" / "run" / "checkpoints" / "best" / "best.json").read_text() == '{"policy_version": 7}'


def test_the_mirror_never_takes_another_runs_place(tmp_path):
    """A new run with a name the mirror already holds is refused (its first push would delete
    that run there); so is a resume from a run directory older than the mirror's checkpoints
    (the run went on on another node)."""
    mirror = f"file://{tmp_path}/mirror"
    RunStorage(mirror, "run").push(_fake_run(tmp_path / "elsewhere" / "run", epochs=(0, 1, 2)).root)
    stale = _fake_run(tmp_path / "here" / "run", epochs=(0,))
    storage = RunStorage(mirror, "run")
    with pytest.raises(StorageError, match=r"storage_uri: file://.*/mirror/run already holds a run named 'run' "
                                           r"\(\d+ files\); pass resume_from=latest"):
        storage.check(stale, resuming=False)
    with pytest.raises(StorageError, match=r"holds checkpoint epoch 2, newer than this run directory's newest "
                                           r"\(epoch 0, .*\): the run went on elsewhere"):
        storage.check(stale, resuming=True)
    storage.check(_fake_run(tmp_path / "fresh" / "run", epochs=()), resuming=True)  # nothing here: it is fetched
    storage.check(_fake_run(tmp_path / "caught-up" / "run", epochs=(0, 1, 2)), resuming=True)
    RunStorage(mirror, "another-run").check(stale, resuming=False)


def test_a_storage_that_cannot_take_the_run_fails_before_the_first_epoch(tmp_path):
    from ddpo_ray.training.local_loop import run_local

    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the mirror should go")
    cfg = build_config(overrides=[*SMALL, "num_epochs=1", "eval.every=0", "metrics=false", f"output_dir={tmp_path}",
                                  "run_name=blocked", f"storage_uri=file://{blocker}/mirror"])
    with pytest.raises(StorageError, match=r"storage_uri: cannot write the run's mirror at file://.*not-a-directory/mirror/blocked"):
        run_local(cfg)
    assert RunDirectory(tmp_path / "blocked").read_metrics() == []  # refused before the first epoch


@pytest.mark.parametrize("uri", ["ftp://host/runs", "s3://", "outputs/mirror", "s3:/bucket"])
def test_a_storage_uri_pyarrow_cannot_open_is_refused_by_name(uri):
    with pytest.raises(ValueError, match=r"storage_uri: .*expected <scheme>://<bucket or path>"):
        build_config(overrides=[f"storage_uri={uri}"])


@pytest.mark.slow
def test_a_run_resumes_on_a_node_without_its_run_directory_from_the_mirror(s3_uri, tmp_path):
    """The single-process loop (the same epoch loop as the Ray driver): a run mirrored to S3,
    its local run directory lost, `resume_from=latest` fetches it and continues exactly."""
    from ddpo_ray.training.local_loop import run_local

    common = [*SMALL, "eval.every=0", "metrics=false", "save_freq=1", "keep_last_n=1", f"storage_uri={s3_uri}"]
    reference = run_local(build_config(overrides=[*common, "num_epochs=3", f"output_dir={tmp_path}/ref", "run_name=r"]))
    run_local(build_config(overrides=[*common, "num_epochs=2", f"output_dir={tmp_path}/a", "run_name=lost"]))
    shutil.rmtree(tmp_path / "a" / "lost")  # the node, and its disk, are gone
    resumed = run_local(build_config(overrides=[*common, "num_epochs=3", f"output_dir={tmp_path}/b", "run_name=lost",
                                                "resume_from=latest"]))
    assert [row["epoch"] for row in resumed] == [0, 1, 2]
    for got, want in zip(resumed, reference, strict=True):
        assert got["reward_mean"] == pytest.approx(want["reward_mean"], rel=1e-5)
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4, abs=1e-7)
    mirror = RunStorage(s3_uri, "lost")
    fresh = tmp_path / "c" / "lost"
    mirror.pull(fresh)
    assert [p.name for p in (fresh / "checkpoints").iterdir()] == ["epoch_0002"]  # keep_last_n=1, there too
