"""A run kept beyond the driver's disk: its run directory mirrored to a storage URI.

The driver writes every file of a run into `output_dir/run_name` on its own node (the learner
hands it its checkpoints). With `storage_uri` (s3://, gs://, hdfs://, abfs://, file://), the
driver also mirrors that directory to `<storage_uri>/<run_name>/` after every checkpoint and when
the run ends, so a run outlives the node it ran on; `resume_from=latest` on a node that lacks the
run directory first fetches it from there.

The mirror keeps the checkpoints' guarantees: a checkpoint's COMPLETE marker (and best/'s
best.json, which names the best weights) is uploaded after every other file of the push, and
deleted there before any file of its directory changes, so a mirrored checkpoint with COMPLETE
is whole. Checkpoints pruned locally (`keep_last_n`) are deleted there too. The mirror never
overwrites a different run: a new run refuses a run name the mirror already holds, and a resume
refuses a run directory here older than the mirror's newest checkpoint.

Through pyarrow.fs, which Ray uses for its own storage: credentials come from the environment, as
for any client of that store (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or an instance role for
S3, GOOGLE_APPLICATION_CREDENTIALS for GCS); options go in the URI's query
(`s3://bucket/runs?endpoint_override=minio:9000&scheme=http`).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ddpo_ray.records.checkpoint import BEST_INFO
from ddpo_ray.records.run_dir import CHECKPOINT_NAME, CHECKPOINTS_DIR, COMPLETE_MARKER, RunDirectory

log = logging.getLogger(__name__)

STORAGE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")
_PROBE = ".ddpo_ray_probe"
_WRITTEN_LAST = (COMPLETE_MARKER, BEST_INFO)  # each says the other files of its directory are whole
_REMOTE_CHECKPOINT = re.compile(rf"{CHECKPOINTS_DIR}/{CHECKPOINT_NAME.pattern}/{COMPLETE_MARKER}")


def _written_last(rel: str) -> bool:
    return Path(rel).name in _WRITTEN_LAST


class StorageError(OSError):
    """The storage URI cannot be reached, written or read, or holds another run."""


def check_storage_uri(uri: str) -> str:
    """The URI's syntax only (no network): a scheme pyarrow.fs knows and a path after it."""
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in STORAGE_SCHEMES or not rest.strip("/"):
        raise ValueError(
            f"{uri!r}: expected <scheme>://<bucket or path>[/<prefix>] with a scheme of {list(STORAGE_SCHEMES)}"
        )
    return uri


class RunStorage:
    """One run's place under a storage URI; `push` mirrors the local run directory there."""

    def __init__(self, uri: str, run_name: str) -> None:
        import pyarrow.fs

        check_storage_uri(uri)
        self.uri = f"{uri.split('?')[0].rstrip('/')}/{run_name}"
        try:
            self.fs, base = pyarrow.fs.FileSystem.from_uri(uri)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds; all mean the same here
            raise StorageError(f"storage_uri={uri!r}: {type(exc).__name__}: {exc}") from None
        self.root = f"{base.rstrip('/')}/{run_name}"
        self._pushed: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) last uploaded

    def __repr__(self) -> str:
        return f"RunStorage({self.uri!r})"

    def check(self, run_dir: RunDirectory | None = None, resuming: bool = False) -> None:
        """Write, read back and delete a probe file: run before the first epoch, so a storage that
        cannot take the run fails now and not at the first checkpoint. With `run_dir`, also that
        the mirror holds no other run: none at all for a new run, and for a resumed one no
        checkpoint newer than the run directory's here (its first push would delete it)."""
        self._probe()
        if run_dir is None:
            return
        remote = [rel for rel in self._remote_files() if rel != _PROBE]
        if remote and not resuming:
            raise StorageError(
                f"storage_uri: {self.uri} already holds a run named {Path(self.root).name!r} ({len(remote)} files); "
                "pass resume_from=latest to continue it, or another run_name"
            )
        local = run_dir.list_checkpoints()
        newest_there = max((int(m.group(1)) for rel in remote if (m := _REMOTE_CHECKPOINT.fullmatch(rel))), default=None)
        if local and newest_there is not None and newest_there > local[-1][0]:
            raise StorageError(
                f"storage_uri: {self.uri} holds checkpoint epoch {newest_there}, newer than this run directory's "
                f"newest (epoch {local[-1][0]}, {run_dir.root}): the run went on elsewhere; remove or move "
                "the run directory here to resume from the mirror"
            )

    def _probe(self) -> None:
        path = f"{self.root}/{_PROBE}"
        try:
            self.fs.create_dir(self.root, recursive=True)
            with self.fs.open_output_stream(path) as stream:
                stream.write(b"ddpo-ray")
            with self.fs.open_input_stream(path) as stream:
                if stream.read() != b"ddpo-ray":
                    raise StorageError("the probe file read back differently")
            self.fs.delete_file(path)
        except Exception as exc:  # noqa: BLE001 - named and re-raised
            raise StorageError(
                f"storage_uri: cannot write the run's mirror at {self.uri} ({type(exc).__name__}: {exc}); "
                "check the URI and the credentials in this process's environment"
            ) from None

    def _remote_files(self) -> dict[str, int]:
        """Relative path -> size of every file under this run's place (empty when there is none)."""
        import pyarrow.fs

        try:
            infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self.root, recursive=True, allow_not_found=True))
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"storage_uri: cannot list {self.uri}: {type(exc).__name__}: {exc}") from None
        prefix = self.root.rstrip("/") + "/"
        return {info.path[len(prefix):]: info.size for info in infos if info.type == pyarrow.fs.FileType.File}

    def push(self, run_root: Path) -> int:
        """Mirror `run_root` here: upload what changed since the last push, delete what is gone
        locally; the markers (COMPLETE, best.json) of changing directories deleted first, and
        uploaded after every other file. Returns the files uploaded. (A new process's first push
        uploads every file once: it does not know what an earlier one sent.)"""
        remote = self._remote_files()
        local: dict[str, tuple[Path, tuple[int, int]]] = {}
        for path in sorted(Path(run_root).rglob("*")):
            try:
                if path.is_file():
                    stat = path.stat()
                    local[path.relative_to(run_root).as_posix()] = (path, (stat.st_size, stat.st_mtime_ns))
            except FileNotFoundError:
                continue  # deleted while we looked (a pruned checkpoint, a tracker's temporary file)
        gone = [rel for rel in remote if rel not in local and rel != _PROBE]
        changed = [rel for rel, (_, stamp) in local.items() if self._pushed.get(rel) != stamp or rel not in remote]
        # A directory whose files change or go loses its markers there first (whole or ignored),
        # and gets them back after its other files, whether or not a marker changed here.
        touched = {parent for rel in changed + gone if not _written_last(rel) for parent in Path(rel).parents}
        unmarked = [rel for rel in remote if _written_last(rel) and (rel in gone or Path(rel).parent in touched)]
        changed += [rel for rel in unmarked if rel in local and rel not in changed]
        uploaded = 0
        try:
            for rel in unmarked:
                self.fs.delete_file(f"{self.root}/{rel}")
            for rel in sorted(changed, key=_written_last):  # markers last
                path, stamp = local[rel]
                try:
                    self._upload(path, rel, stamp)
                except FileNotFoundError:
                    continue  # deleted since the listing: the next push deletes it there too
                uploaded += 1
            for rel in gone:
                if rel not in unmarked:
                    self.fs.delete_file(f"{self.root}/{rel}")
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"storage_uri: mirroring to {self.uri} failed: {type(exc).__name__}: {exc}") from None
        log.debug("mirrored %s to %s: %d uploaded, %d deleted", run_root, self.uri, uploaded, len(gone))
        return uploaded

    def _upload(self, path: Path, rel: str, stamp: tuple[int, int]) -> None:
        target = f"{self.root}/{rel}"
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with open(path, "rb") as source, self.fs.open_output_stream(target) as stream:
            while chunk := source.read(1 << 22):
                stream.write(chunk)
        self._pushed[rel] = stamp

    def pull(self, run_root: Path) -> int:
        """Fetch every file of the mirror that `run_root` lacks (a resume on another node); returns
        how many. Files already here are kept; markers come last."""
        run_root = Path(run_root)
        fetched = 0
        try:
            for rel in sorted(self._remote_files(), key=_written_last):
                target = run_root / rel
                if rel == _PROBE or target.exists():
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(target.name + ".part")
                with self.fs.open_input_stream(f"{self.root}/{rel}") as stream, open(partial, "wb") as out:
                    while chunk := stream.read(1 << 22):
                        out.write(chunk)
                partial.replace(target)
                fetched += 1
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"storage_uri: fetching {self.uri} failed: {type(exc).__name__}: {exc}") from None
        return fetched
