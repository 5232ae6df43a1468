"""Where a grid's Tune experiment lives: a local or shared path, or a pyarrow-filesystem URI.

Layout under the storage root (``--storage``, default ``results/<grid>/ray``):
``<grid>/<trial_id>/checkpoint_NNNNNN/`` (Tune's experiment: results, checkpoints, state) and
``<grid>.resume/<trial_id>/`` (the checkpoint of a trial an earlier run left unfinished, carried
over because every run of the grid is a fresh Tune experiment). A trial's TensorBoard event files
(``<grid>/<trial_id>/events.out.tfevents.*``, ``sweeps.tracking``) outlive the experiment that
wrote them: the next run of the grid adds its own beside them, so TensorBoard shows each trial as
one run across continuations. The driver touches the storage only through this module and Ray; it
never reads a worker's disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs

MANIFEST = "manifest.json"  # as sweeps.trainable writes it (this module does not import it)
EVENTS_PREFIX = "events.out.tfevents."  # TensorBoard event files, kept from run to run


class Storage:
    """A storage root: ``uri`` as given (a path is made absolute), ``fs`` and ``path`` for pyarrow."""

    def __init__(self, where: str | Path):
        where = str(where)
        if "://" in where:
            self.fs, self.path = pafs.FileSystem.from_uri(where)
            self.uri = where.rstrip("/")
            self.local = isinstance(self.fs, pafs.LocalFileSystem)
        else:
            self.fs, self.path = pafs.LocalFileSystem(), str(Path(where).absolute())
            self.uri, self.local = self.path, True
        self.path = self.path.rstrip("/")

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    def _uri(self, rel: str) -> str:
        return f"{self.uri}/{rel}"

    def _exists(self, rel: str) -> bool:
        return self.fs.get_file_info(f"{self.path}/{rel}").type != pafs.FileType.NotFound

    def _delete(self, rel: str) -> None:
        if self._exists(rel):
            self.fs.delete_dir(f"{self.path}/{rel}")

    def _complete(self, rel: str) -> int | None:
        """The step of the checkpoint directory ``rel`` if every file of its manifest is there
        with its size ("final" for a finished trial's last checkpoint), else None."""
        try:
            with self.fs.open_input_stream(f"{self.path}/{rel}/{MANIFEST}") as f:
                manifest = json.loads(f.read())
        except (FileNotFoundError, OSError, ValueError):
            return None
        base = f"{self.path}/{rel}"
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True))
        sizes = {i.path[len(base) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}
        if any(sizes.get(k) != v for k, v in manifest["files"].items()):
            return None
        return manifest["step"] if manifest["step"] is not None else "final"

    def latest_checkpoint(self, experiment: str, trial_id: str) -> str | None:
        """The newest complete ``checkpoint_*`` of a trial in an experiment (relative path)."""
        base = f"{self.path}/{experiment}/{trial_id}"
        if self.fs.get_file_info(base).type != pafs.FileType.Directory:
            return None
        names = sorted((i.base_name for i in self.fs.get_file_info(pafs.FileSelector(base))
                        if i.base_name.startswith("checkpoint_")), reverse=True)
        for name in names:
            rel = f"{experiment}/{trial_id}/{name}"
            if self._complete(rel) is not None:
                return rel
        return None

    def _drop_experiment(self, experiment: str) -> None:
        """Delete a previous experiment except its trials' TensorBoard event files."""
        if not self._exists(experiment):
            return
        base = f"{self.path}/{experiment}"
        kept = False
        for info in self.fs.get_file_info(pafs.FileSelector(base)):
            if info.type != pafs.FileType.Directory:
                self.fs.delete_file(info.path)
                continue
            events = False
            for sub in self.fs.get_file_info(pafs.FileSelector(info.path)):
                if sub.type == pafs.FileType.File and sub.base_name.startswith(EVENTS_PREFIX):
                    events = True
                elif sub.type == pafs.FileType.Directory:
                    self.fs.delete_dir(sub.path)
                else:
                    self.fs.delete_file(sub.path)
            if not events:
                self.fs.delete_dir(info.path)
            kept = kept or events
        if not kept:
            self.fs.delete_dir(base)

    def prepare_run(self, experiment: str, pending: list[str]) -> dict[str, str]:
        """Before a fresh Tune experiment: carry the newest complete checkpoint of each pending
        trial out of the previous experiment (into ``<experiment>.resume/<trial_id>``), drop the
        previous experiment (all but its trials' TensorBoard event files) and the carried
        checkpoints of trials no longer pending.

        Returns: trial id -> the URI of the checkpoint it resumes from (pending trials only).
        """
        resume = f"{experiment}.resume"
        for tid in pending:
            rel = self.latest_checkpoint(experiment, tid)
            if rel is None:
                continue
            self._delete(f"{resume}/{tid}")
            self.fs.create_dir(f"{self.path}/{resume}", recursive=True)
            if self.local:  # a rename; on object stores a copy
                self.fs.move(f"{self.path}/{rel}", f"{self.path}/{resume}/{tid}")
            else:
                pafs.copy_files(f"{self.path}/{rel}", f"{self.path}/{resume}/{tid}",
                                source_filesystem=self.fs, destination_filesystem=self.fs)
        self._drop_experiment(experiment)
        out = {}
        if self._exists(resume):
            for info in self.fs.get_file_info(pafs.FileSelector(f"{self.path}/{resume}")):
                tid = info.base_name
                if tid not in pending:
                    self._delete(f"{resume}/{tid}")
                elif self._complete(f"{resume}/{tid}") is not None:
                    out[tid] = self._uri(f"{resume}/{tid}")
        return out

    def forget(self, experiment: str, trial_ids: list[str]) -> None:
        """Drop the carried checkpoints of trials that have finished."""
        for tid in trial_ids:
            self._delete(f"{experiment}.resume/{tid}")

    def delete(self, experiment: str) -> None:
        """Drop the experiment and its carried checkpoints (``--force``)."""
        self._delete(experiment)
        self._delete(f"{experiment}.resume")
