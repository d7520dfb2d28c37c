"""Output safety: nothing a user gave the tool is overwritten, and nothing is left half-written.

An ``Outputs`` is the set of files one run writes (the model, ``--plan``, ``--report``, ``--save-stats``,
``--check-json``, ``--json``, a big model's external data) and of the files it reads (the input models, their
external-data files, calibration / validation data, labels, loaded statistics, recipes). ``validate()``, called
before any work, refuses

* an output that *is* an input, compared by identity (device and inode): a hard link, a symlink, a symlinked
  folder or ``a/../b`` all reach the same file; outputs that do not exist yet are compared by their resolved
  real paths;
* two outputs naming one file;
* an output that exists and is not a regular file (a device, a FIFO, a socket, a folder);
* an output whose folder is missing, not a folder, or not writable: each output's temporary is created right
  there (the only test of writability that also holds for root and read-only mounts).

Every artifact is written to a temporary beside its target, named ``.onnxfp8-tmp-<pid>-<token>-<name>`` (a
big model is saved into a temporary folder ``.onnxfp8-tmp-<pid>-<token>`` with its ``.data`` file), and
``commit()`` renames them all into place at the end; ``discard()`` (also on any exception inside a ``with``
block) removes them. ``install_signal_handlers()`` (the CLI calls it) turns SIGTERM into an exception, so the
temporaries are removed on SIGTERM as on Ctrl-C. A process killed outright (SIGKILL, a power cut) leaves its
temporaries; ``validate()`` sweeps those whose process is gone from every folder the run writes to.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import stat
from typing import Dict, Iterable, List, Optional, Tuple, Union

from onnxfp8.errors import ModelError

PathLike = Union[str, os.PathLike]
TMP_PREFIX = ".onnxfp8-tmp-"
_TMP_RE = re.compile(r"^\.onnxfp8-tmp-(\d+)-[0-9a-f]+(-.*)?$")


class OutputError(ModelError):
    """An output cannot be written, or would reach an input (exit 2)."""


def _oserror(path: str, e: OSError, what: str = "") -> str:
    reason = e.strerror or str(e)
    return f"{path}: cannot write {what or 'the file'} ({reason})"


def _identity(path: str) -> Optional[Tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def model_files(path: PathLike) -> List[str]:
    """The model file and the external-data files it refers to (read without loading the data)."""
    path = os.fspath(path)
    files = [path]
    try:
        import onnx

        model = onnx.load(path, load_external_data=False)
    except Exception:  # not readable: load_model will say so; the file itself is still protected
        return files
    folder = os.path.dirname(os.path.abspath(path))

    def tensors(graph):
        yield from graph.initializer
        for node in graph.node:
            for a in node.attribute:
                if a.HasField("t"):
                    yield a.t
                if a.HasField("g"):
                    yield from tensors(a.g)
                for g in a.graphs:
                    yield from tensors(g)

    seen = set()
    for t in tensors(model.graph):
        for e in t.external_data:
            if e.key == "location" and e.value not in seen:
                seen.add(e.value)
                files.append(os.path.join(folder, e.value))
    return files


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    except OSError:
        return True
    return True


def sweep(folder: PathLike) -> List[str]:
    """Remove the temporaries of dead onnxfp8 processes from ``folder``; returns what was removed."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _TMP_RE.match(name)
        if not m or pid_alive(int(m.group(1))):
            continue
        p = os.path.join(folder, name)
        try:
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)
            removed.append(p)
        except OSError:
            pass
    return removed


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


_LIVE: Dict[int, "Outputs"] = {}  # the Outputs with temporaries on disk (the signal handler removes them)


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so ``finally`` blocks (temporaries' removal) run."""


def _on_sigterm(signum, frame):  # pragma: no cover - exercised through a subprocess in the tests
    for o in list(_LIVE.values()):
        o.discard()
    raise Terminated()


def install_signal_handlers() -> None:
    """SIGTERM raises Terminated (the CLI exits 143 after removing the temporaries); Ctrl-C already raises."""
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # not the main thread
        pass


class Outputs:
    """The files one run reads (protected) and writes (staged in temporaries, renamed at ``commit``)."""

    def __init__(self) -> None:
        self._inputs: List[Tuple[str, str]] = []  # (path, what)
        self._outputs: Dict[str, str] = {}  # path as given -> what (the option)
        self._tmp: Dict[str, str] = {}  # path -> its temporary file (created by validate)
        self._dirs: List[str] = []  # temporary folders (big models)
        self._renames: List[Tuple[str, str]] = []  # (temporary, target) beyond the files of _tmp
        self._written: set = set()
        self._data_files: Dict[str, str] = {}  # <model>.data of model outputs: checked, written only if big
        self._validated = False
        self._token = secrets.token_hex(4)

    # -- declaring --------------------------------------------------------------------------------
    def protect(self, path: Optional[PathLike], what: str = "input") -> None:
        """A file (or folder: the files directly in it) this run reads; no output may reach it."""
        if path is None:
            return
        path = os.fspath(path)
        if os.path.isdir(path):
            try:
                for name in os.listdir(path):
                    self._inputs.append((os.path.join(path, name), what))
            except OSError:
                pass
        else:
            self._inputs.append((path, what))

    def protect_model(self, path: Optional[PathLike], what: str = "the input model") -> None:
        if path is None:
            return
        files = model_files(path)
        self._inputs.append((files[0], what))
        for f in files[1:]:
            self._inputs.append((f, f"an external-data file of {what} {files[0]}"))

    def add(self, path: Optional[PathLike], what: str, model: bool = False) -> Optional[str]:
        """Declare an output (``what``: the option that names it, for messages). ``model``: a model, which over
        2 GB also writes ``<path>.data`` (checked against the inputs too)."""
        if path is None:
            return None
        path = os.fspath(path)
        if self._validated:
            raise RuntimeError("Outputs.add after validate")
        if path in self._outputs and self._outputs[path] != what:
            raise OutputError(f"{path}: {what} and {self._outputs[path]} name the same file; give each its own")
        self._outputs.setdefault(path, what)
        if model:
            self._data_files[path + ".data"] = f"the external data of {what}"
        return path

    @property
    def paths(self) -> List[str]:
        return list(self._outputs)

    # -- checks -----------------------------------------------------------------------------------
    def validate(self) -> "Outputs":
        """Every check, before any work; creates each output's temporary (the writability test)."""
        inputs = []
        for p, what in self._inputs:
            inputs.append((p, what, _identity(p), os.path.realpath(p)))
        seen: Dict[str, str] = {}
        for path, what in list(self._outputs.items()) + list(self._data_files.items()):
            self._check_one(path, what, inputs, seen)
        try:
            for path in self._outputs:
                folder = os.path.dirname(os.path.abspath(path))
                sweep(folder)
                self._tmp[path] = self._create_tmp(path)
        except BaseException:
            self.discard()
            raise
        self._validated = True
        _LIVE[id(self)] = self
        return self

    def _check_one(self, path: str, what: str, inputs, seen: Dict[str, str]) -> None:
        real = os.path.realpath(path)
        ident = _identity(path)
        for p, pwhat, pid_, preal in inputs:
            if (ident is not None and ident == pid_) or real == preal:
                same = "" if os.path.abspath(p) == os.path.abspath(path) else f" ({p})"
                raise OutputError(f"{path}: refusing to overwrite {pwhat}{same} with {what}; choose another file")
        if real in seen:
            raise OutputError(f"{path}: {what} and {seen[real]} name the same file; give each its own")
        seen[real] = what
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            st = None
        except OSError as e:
            raise OutputError(_oserror(path, e)) from None
        if st is not None and not stat.S_ISREG(st.st_mode):
            kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or
                    stat.S_ISBLK(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else
                    "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
            raise OutputError(f"{path}: {what} is {kind}, not a regular file; refusing to replace it")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.exists(folder):
            raise OutputError(f"{path}: the folder {folder} of {what} does not exist")
        if not os.path.isdir(folder):
            raise OutputError(f"{path}: {folder} (the folder of {what}) is not a folder")

    def _tmp_name(self, path: str) -> str:
        folder = os.path.dirname(os.path.abspath(path))
        return os.path.join(folder, f"{TMP_PREFIX}{os.getpid()}-{self._token}-{os.path.basename(path)}")

    def _create_tmp(self, path: str) -> str:
        tmp = self._tmp_name(path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            os.close(fd)
        except OSError as e:
            raise OutputError(_oserror(path, e, self._outputs[path])) from None
        return tmp

    # -- writing ----------------------------------------------------------------------------------
    def temporary(self, path: PathLike) -> str:
        """The temporary file staged for ``path`` (write it yourself; ``commit`` renames it)."""
        path = os.fspath(path)
        if not self._validated:
            self.validate()
        if path not in self._tmp:
            raise RuntimeError(f"{path} was not declared as an output")
        self._written.add(path)
        return self._tmp[path]

    def write_text(self, path: PathLike, text: str) -> None:
        tmp = self.temporary(path)
        try:
            _write(tmp, text.encode("utf-8"))
        except OSError as e:
            raise OutputError(_oserror(os.fspath(path), e, self._outputs[os.fspath(path)])) from None

    def write_model(self, path: PathLike, model) -> None:
        """Stage ``model``; over 2 GB it goes with external data ``<file>.data`` (saved in a temporary folder
        beside the target, both renamed at ``commit``)."""
        from onnxfp8 import modelio

        path = os.fspath(path)
        tmp = self.temporary(path)
        try:
            if modelio.fits_protobuf(model):
                _write(tmp, model.SerializeToString())
                return
            folder = os.path.dirname(os.path.abspath(path))
            tmpdir = os.path.join(folder, f"{TMP_PREFIX}{os.getpid()}-{self._token}")
            os.makedirs(tmpdir, exist_ok=True)
            self._dirs.append(tmpdir)
            data_name = os.path.basename(path) + ".data"
            inner = os.path.join(tmpdir, os.path.basename(path))
            modelio._save_external(model, inner, data_name)
            os.replace(inner, tmp)
            if os.path.exists(os.path.join(tmpdir, data_name)):
                self._renames.append((os.path.join(tmpdir, data_name), os.path.join(folder, data_name)))
        except OSError as e:
            raise OutputError(_oserror(path, e, self._outputs[path])) from None

    def commit(self) -> List[str]:
        """Rename every written temporary into place (data files first, so a model never points at a missing
        one); temporaries of outputs never written are removed. Returns the paths written."""
        done: List[str] = []
        moves = list(self._renames) + [(tmp, path) for path, tmp in self._tmp.items() if path in self._written]
        try:
            for tmp, target in moves:
                try:
                    os.replace(tmp, target)
                except OSError as e:
                    raise OutputError(_oserror(target, e, self._outputs.get(target, ""))) from None
                done.append(target)
        finally:
            self.discard()
        return [p for p in done if p in self._outputs]

    def discard(self) -> None:
        """Remove every temporary (nothing is written)."""
        for tmp in self._tmp.values():
            try:
                os.unlink(tmp)
            except OSError:
                pass
        for d in self._dirs:
            shutil.rmtree(d, ignore_errors=True)
        self._renames = []
        self._dirs = []
        _LIVE.pop(id(self), None)

    def __enter__(self) -> "Outputs":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.discard()  # after commit() there is nothing left to remove

