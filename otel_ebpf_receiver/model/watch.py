"""Hot swap of the state model from a directory, polled by the agent between windows (no thread, no inotify).

Convention: the model served is the most recently deployed valid ``*.onnx`` file in the directory, where
"deployed" is the file's inode change time (ctime). ctime moves on every write, rename (``mv``), ``cp`` and
``touch`` and cannot be set back, so copying or moving a model in deploys it even if it keeps an old mtime,
and ``touch old.onnx`` rolls back to it. Dotfiles and other suffixes (``model.onnx.tmp``) are ignored, so a
writer that writes ``.new.onnx`` or ``new.onnx.tmp`` and renames it into place is atomic.

The directory is an input like any other, so it is trusted only as far as its permissions say:

* the directory must be owned by root (or the agent's user) and not writable by group or others; otherwise
  nothing in it is loaded and that is reported once (``chmod go-w DIR``);
* every file must be a regular file owned by root (or the agent's user) and not writable by group or others;
* symbolic links are NOT followed (they used to be, so that repointing ``current.onnx`` deployed a model): a
  link is rejected once with a one-line reason. Deploy by copying or renaming the file into the directory;
  ``touch`` rolls back. Not following links means nobody who can plant a link makes the agent read another file;
* files are opened with O_NOFOLLOW|O_NONBLOCK and checked with fstat on that descriptor, so a FIFO or a link
  swapped in between the scan and the open is refused instead of blocking the agent or being followed.

Each :meth:`ModelWatcher.poll` lstats every ``*.onnx`` entry: (inode, size, mtime, ctime) (a directory found empty
is only stat'ed until its mtime moves: nothing can appear in it without moving it). An entry is a
candidate once that signature is unchanged across two consecutive polls (a copy still in progress keeps
changing, so a half-written file is never validated) and the signature has not been tried before. Candidates are
validated newest first with :func:`load_model`; the first valid one replaces the serving model
(``on_swap(old, new)``); each invalid one is reported once per signature (``on_reject(path, error)``) and the old
model keeps serving. So a valid file is serving within two polls of appearing complete. A file rewritten in place
changes its signature and is tried again; a served file that is deleted keeps serving from memory until
something newer. Validating a new graph runs it once in a child process (``sandbox.py``): the poll that does it
waits up to ``SANDBOX_SECONDS`` for a pathological graph, once per signature.

Whatever a file holds, :meth:`poll` and :meth:`load_initial` never raise: an unexpected error while validating
is a rejection like any other (the agent must not exit, or crash-loop under systemd, because of a file).

A writer that pauses for longer than one interval in the middle of a copy can get one spurious rejection
(its signature is retried as soon as it changes again); write-then-rename avoids even that.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from typing import Callable, Sequence

from .contract import DEFAULT_MAX_BYTES, ModelError, printable
from .runtime import StateModel, load_model

BUNDLED_MODEL_DIR = Path(__file__).resolve().parent / "bundled"   # what `make model` writes; shipped in the package
DEFAULT_MODEL_DIR = Path("/var/lib/otel-ebpf-receiver/models")  # watched: drop a .onnx file here to swap

Signature = tuple[int, int, int, int]  # inode, size, mtime_ns, ctime_ns

OnSwap = Callable[[StateModel | None, StateModel], None]
OnReject = Callable[[Path, ModelError], None]


class ModelWatcher:
    """Serve the newest valid model in ``model_dir``; swap when a newer one appears, reject bad ones.

    ``model`` is an already-loaded model to serve until the directory offers one (e.g. the bundled default).
    """

    def __init__(self, model_dir: str | os.PathLike[str], available_features: Sequence[str] | None,
                 on_swap: OnSwap | None = None, on_reject: OnReject | None = None, *,
                 model: StateModel | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.model_dir = Path(model_dir)
        self.available_features = list(available_features) if available_features is not None else None
        self.on_swap = on_swap
        self.on_reject = on_reject
        self.max_bytes = max_bytes
        self._model = model
        self._seen: dict[Path, tuple[Signature, bool]] = {}   # path -> (signature, unchanged since last poll)
        self._tried: dict[Path, Signature] = {}                # path -> signature last validated (either way)
        self._reload_requested = False
        self._directory_refused: tuple[int, int] | None = None   # (uid, mode) already reported
        self._empty_at: tuple[int, int] | None = None             # (inode, mtime_ns) of the directory seen empty

    @property
    def model(self) -> StateModel | None:
        """The model to score with now (None until one loads)."""
        return self._model

    # -- what the agent calls ---------------------------------------------------------------------------------
    def load_initial(self) -> StateModel | None:
        """At start-up: serve the newest valid file now, without waiting for two polls (files present at
        start are taken as complete; a damaged one is rejected and the next newest tried)."""
        return self._load_newest(self._scan(), force=True)

    def poll(self) -> StateModel | None:
        """Call once per window. Returns the new model if it swapped this poll, else None."""
        if self._reload_requested:
            self._reload_requested = False
            return self.force_reload()
        return self._load_newest(self._scan(), force=False)

    def request_reload(self) -> None:
        """Safe to call from a signal handler (SIGHUP): the next :meth:`poll` does :meth:`force_reload`."""
        self._reload_requested = True

    def force_reload(self) -> StateModel | None:
        """Re-validate now and serve the newest valid file, even one already tried or not yet stable."""
        return self._load_newest(self._scan(), force=True)

    # -- internals --------------------------------------------------------------------------------------------
    def _scan(self) -> dict[Path, Signature]:
        found: dict[Path, Signature] = {}
        try:
            st = os.stat(self.model_dir)
            if not self._directory_trusted(st):
                entries = []
            elif (st.st_ino, st.st_mtime_ns) == self._empty_at:
                entries = []  # still empty: nothing was created, renamed in or removed since (see below)
            else:
                entries = list(os.scandir(self.model_dir))
                # An empty directory whose mtime is over a second old stays empty until its mtime moves: the scan
                # is skipped until then (the agent polls every window, usually finding nothing). The second keeps
                # a creation in the same timestamp tick as the last change from going unseen.
                old = time.time_ns() - st.st_mtime_ns > 1_000_000_000
                self._empty_at = (st.st_ino, st.st_mtime_ns) if not entries and old else None
        except OSError:
            entries = []  # a missing directory is "no models yet", not an error: it can be created later
        for entry in entries:
            if entry.name.startswith(".") or not entry.name.endswith(".onnx"):
                continue
            try:
                st = entry.stat(follow_symlinks=False)  # a link, FIFO or directory is a candidate to refuse once
            except OSError:
                continue
            found[Path(entry.path)] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        previous = self._seen
        self._seen = {p: (sig, previous.get(p, (None, False))[0] == sig) for p, sig in found.items()}
        for gone in [p for p in self._tried if p not in found]:
            del self._tried[gone]
        return found

    def _directory_trusted(self, st: os.stat_result) -> bool:
        """Owner root or us, not writable by group or others; a refusal is reported once per directory state."""
        problem = None
        if st.st_uid not in (0, os.geteuid()):
            problem = (f"directory is owned by uid {st.st_uid}, not root or this agent's user",
                       f"chown root {printable(str(self.model_dir))}")
        elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            problem = (f"directory is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}), so "
                       "anyone could plant a model", f"chmod go-w {printable(str(self.model_dir))}")
        state = (st.st_uid, st.st_mode)
        if problem is not None and self._directory_refused != state:
            self._directory_refused = state
            if self.on_reject is not None:
                self.on_reject(self.model_dir, ModelError(self.model_dir, problem[0], problem[1] + "; nothing in it "
                                                          "is loaded until then"))
        if problem is None:
            self._directory_refused = None
        return problem is None

    def _load_newest(self, found: dict[Path, Signature], *, force: bool) -> StateModel | None:
        if force:
            candidates = list(found)
        else:
            candidates = [p for p, (sig, stable) in self._seen.items() if stable and self._tried.get(p) != sig]
        # newest deployment first: ctime, then mtime, then name for a stable order
        candidates.sort(key=lambda p: (found[p][3], found[p][2], p.name), reverse=True)
        for i, path in enumerate(candidates):
            self._tried[path] = found[path]
            try:
                new = load_model(path, self.available_features, max_bytes=self.max_bytes, check_owner=True)
            except ModelError as err:
                if self.on_reject is not None:
                    self.on_reject(path, err)
                continue
            except Exception as exc:  # a validation bug must cost one file, never the agent
                if self.on_reject is not None:
                    self.on_reject(path, ModelError(path, f"unexpected {type(exc).__name__} while validating "
                                                          f"({exc})", "the file is refused; please report this"))
                continue
            for older in candidates[i + 1:]:
                self._tried[older] = found[older]  # superseded: never swap back to them without a change
            old, self._model = self._model, new
            if self.on_swap is not None:
                self.on_swap(old, new)
            return new
        return None


def best_bundled_model(available: list[str], say: Callable[[str], None]) -> StateModel | None:
    """The bundled model that uses the most of the features this host produces. The package ships one model for
    host probes only and one that also knows network states (XDP features); which one fits depends on the
    probes that attached here."""
    loaded = []
    errors = []
    for path in sorted(BUNDLED_MODEL_DIR.glob("*.onnx")):
        try:
            loaded.append(load_model(path, available, bundled=True))
        except ModelError as exc:
            errors.append(str(exc))
    if not loaded:
        if errors:
            say(f"no bundled state model fits the probes attached here: {errors[0]}")
        return None
    return max(loaded, key=lambda m: len(m.feature_names))
