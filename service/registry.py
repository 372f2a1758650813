"""The models the service serves, and how they change while it runs.

**What is a model.** Every model directly in the checkpoint directory: this project's
``*.safetensors`` checkpoints (named by file stem; training's resumable ``*.state.safetensors``
files are not models) and diffusers pipeline or model folders (named by folder; pixel-space:
:mod:`diffusion.diffusers_format`, Stable Diffusion family: :mod:`diffusion.sd_format`). Other files
are ignored; a well-formed folder of a kind that is not served (:class:`diffusion.UnsupportedModel`)
is skipped with a logged warning. An optional ``aliases.json`` maps names to models
(``{"prod": "mnist-v3"}``); a request resolves its alias once, when it arrives, so a client sees an
alias move between two requests, never within one.

**Control modes** (``model_control``): ``none`` scans the directory once at start-up, and a broken
file stops the start (the behaviour before models could change); ``poll`` (the default: the
train → serve loop, where training writes checkpoints into the served directory) rescans it every
``poll_s`` seconds; ``explicit`` changes models only through the admin API
(:mod:`service.api.admin`), which every mode has. A polled file becomes a model once it is complete (a
safetensors file whose header accounts for its size; a folder unchanged for one poll interval);
a file that stays incomplete for an interval is read, and its load fails, naming it; training
writes under a temporary name and renames, so it is never read half-written. A changed
model that is on the device is reloaded beside the old weights; the engine swaps them between two
iterations (:meth:`service.engine.Engine.install`): rows in flight finish on the old weights,
requests admitted afterwards run on the new, with no gap. A reload that fails keeps the old weights
serving and shows the error (``/models``, ``/admin/models``, the log, a metric). A removed model is
unloaded once its requests are done.

**Residency.** Model weights on the device are bounded by ``budget_bytes``. A model is loaded when
a request first needs it (at start-up: the default model, then others while they fit); when a
load would exceed the budget, the least recently used model with nothing in flight or queued (no
*lease*) is evicted first. A request for a model being loaded waits for it within its deadline. A
model larger than the whole budget fails with an error that says so. Loads, reloads and unloads run
one at a time on one loader thread, so concurrent reloads of a model are serialised.

The registry knows nothing of HTTP; the engine learns of changes through :meth:`attach`'s engine
(``install``/``remove``/``busy``), metrics through an observer.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

import diffusion
from diffusion import ModelCard, Pipeline, UnsupportedModel
from diffusion.loading import is_model

log = logging.getLogger("service.registry")

PREFERRED_DEFAULT = "mnist-text-compact"
MODES = ("none", "poll", "explicit")
ALIASES_FILE = "aliases.json"


class NoCheckpoints(RuntimeError):
    """The checkpoint directory holds nothing to serve."""


class UnknownModel(LookupError):
    def __init__(self, name: str, known: list[str]):
        super().__init__(f"unknown model {name!r}; available: {', '.join(known)}")
        self.name = name


class ModelUnavailable(RuntimeError):
    """The model exists but cannot serve now (its load failed, or it was unloaded); ``retry_after_s``:
    when asking again may help (None: not until someone acts)."""

    def __init__(self, message: str, retry_after_s: int | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class LoadError(RuntimeError):
    """A load or reload failed (the message names the file and why); ``transient``: for want of room
    in the memory budget now (the model stays available), not because of its files."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


def model_name(path: Path) -> str:
    return path.stem if path.is_file() else path.name


def _candidates(directory: Path) -> list[Path]:
    out = []
    for p in sorted(directory.iterdir(), key=lambda p: p.name):
        if p.name.startswith(".") or p.name.endswith(".state.safetensors") or not is_model(p):
            continue
        if any(c in model_name(p) for c in "@~"):  # the engine's batch keys use them
            log.warning("skipping %s: a model name may not contain '@' or '~'", p)
            continue
        out.append(p)
    return out


def find_checkpoints(directory: Path) -> list[Path]:
    """The models directly in ``directory`` (``*.safetensors`` files and diffusers folders), by name; a
    clear error when there are none or two share a name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise NoCheckpoints(f"checkpoint directory {directory.resolve()} does not exist "
                            "(set --checkpoint-dir / DIFFUSION_CHECKPOINT_DIR)")
    paths = _candidates(directory)
    if not paths:
        raise NoCheckpoints(f"no *.safetensors checkpoint nor diffusers model folder in {directory.resolve()} "
                            "(train one with `python -m training` or point --checkpoint-dir at a directory that has one)")
    names = [model_name(p) for p in paths]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise NoCheckpoints(f"two models in {directory.resolve()} share the name {twice[0]!r} (a file and a folder)")
    return paths


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {setting!r} requested but CUDA is not available")
    return device


# --- files ------------------------------------------------------------------------------------------
def signature(path: Path) -> tuple:
    """What changes when a model's files do: sizes and modification times (every file of a folder)."""
    if path.is_file():
        st = path.stat()
        return (st.st_size, st.st_mtime_ns, st.st_ino)
    files = []
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            files.append((str(p.relative_to(path)), st.st_size, st.st_mtime_ns))
    return tuple(files)


def safetensors_complete(path: Path) -> bool:
    """Whether a safetensors file is whole: its header parses and its tensors end where the file does."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8 or n > 100 * 2**20:
                return False
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return size == 8 + n + end
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return False


def content_hash(path: Path) -> str:
    """SHA-256 (16 hex digits) of a checkpoint file's bytes; of a folder, of every file's name, size and
    modification time and every JSON config's bytes (reading gigabytes of weights at each load of a
    pipeline folder would cost more than the load)."""
    h = hashlib.sha256()
    if path.is_file():
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    else:
        h.update(repr(signature(path)).encode())
        for p in sorted(path.rglob("*.json")):
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def disk_bytes(path: Path) -> int:
    """The weights' bytes on disk: what a load is assumed to need on the device until it is measured
    (a folder's fp16 variant files are counted only where they are all it has)."""
    if path.is_file():
        return path.stat().st_size
    weights = [p for p in path.rglob("*.safetensors")]
    plain = [p for p in weights if ".fp16." not in p.name]
    return sum(p.stat().st_size for p in (plain or weights))


def device_bytes(pipe: Pipeline) -> int:
    """Bytes of a loaded model's parameters and buffers (each storage once)."""
    seen, total = set(), 0
    for t in [*pipe.model.parameters(), *pipe.model.buffers()]:
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def memory_budget(setting: str, device: torch.device) -> int:
    """Bytes from a setting: a fraction of the device's memory (``"0.6"``; on the CPU, of the RAM) or a
    size (``"8GB"``, ``"512MiB"``, ``"1000000"``)."""
    text = str(setting).strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[:-len(unit)]) * factor)
    value = float(text)
    if value > 1:
        return int(value)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(value * total)


# --- the registry -----------------------------------------------------------------------------------
@dataclass(eq=False)
class Entry:
    """One model name: where it is, its state, and what is known of it."""
    name: str
    path: Path
    signature: tuple
    state: str = "available"
    pipe: Pipeline | None = None  # on the device (resident), None otherwise
    card: ModelCard | None = None  # of the last load (kept after an eviction: /models still describes it)
    error: str | None = None  # the last load's failure (a failed reload keeps the old weights resident)
    bytes: int = 0  # on the device while resident; else the estimate from disk
    load_s: float | None = None
    loaded_at: float | None = None  # wall-clock time of the last load
    last_used: float = 0.0  # wall-clock time of the last request
    content_hash: str | None = None
    provenance: dict = field(default_factory=dict)  # of the last load (when it was trained, on what)
    leases: int = 0  # requests that hold it (prepared, queued or in flight): never evicted while > 0
    waiters: int = 0  # requests waiting for its load: not evicted while > 0 either
    forgetting: bool = False  # its files are gone: its unload is queued
    fixable: bool = True  # a failed load may succeed once its files change (not: larger than the budget)
    pending: Future | None = None  # the load or reload under way
    loads: int = 0

    @property
    def servable(self) -> bool:
        return self.state not in ("unloaded",)


class Lease:
    """A request's hold on a model (taken before its preparation, released when its job is done)."""

    def __init__(self, registry: "ModelRegistry", name: str, pipe: Pipeline):
        self.registry, self.name, self.pipe = registry, name, pipe
        self._held = True

    def release(self, *_) -> None:
        if self._held:
            self._held = False
            self.registry._release(self.name)


class _NoObserver:
    def declared(self, name): pass

    def loaded(self, name, kind, seconds, nbytes): pass

    def load_failed(self, name, kind): pass

    def evicted(self, name): pass

    def unloaded(self, name): pass


class ModelRegistry:
    """name -> model state; the default model; aliases. Thread-safe: the HTTP layer leases models, the
    loader thread loads and evicts them, the poller rescans."""

    def __init__(self, directory: Path, device: torch.device, *, default: str | None = None,
                 condition_cache_bytes: int = 256 * 2**20, budget_bytes: int | None = None, mode: str = "poll",
                 poll_s: float = 5.0, room_wait_s: float = 60.0, observer=None,
                 loader: Callable[..., Pipeline] | None = None):
        if mode not in MODES:
            raise ValueError(f"model control mode {mode!r}: one of {', '.join(MODES)}")
        self.directory, self.device, self.mode, self.poll_s = Path(directory), device, mode, poll_s
        self.condition_cache_bytes = condition_cache_bytes
        self.budget_bytes = budget_bytes if budget_bytes is not None else 2**62
        self.room_wait_s = room_wait_s
        self.observer = observer or _NoObserver()
        self._load_fn = loader or diffusion.load
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # leases released, models evicted or loaded
        self._entries: dict[str, Entry] = {}
        self._aliases: dict[str, str] = {}
        self._aliases_sig: tuple | None = None
        self._settling: dict[str, tuple] = {}  # a folder seen once: its signature, to compare at the next scan
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="model-loader")
        self._engine = None
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self.default = default or ""

    # --- start-up -------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: Path, device: torch.device, default: str | None = None,
             condition_cache_bytes: int = 256 * 2**20, **kw) -> "ModelRegistry":
        """Scan ``directory`` and load the default model, then the others while they fit the budget."""
        self = cls(directory, device, default=default, condition_cache_bytes=condition_cache_bytes, **kw)
        for path in find_checkpoints(directory):
            name = model_name(path)
            self._entries[name] = Entry(name, path, signature(path), bytes=disk_bytes(path))
        self._read_aliases()
        if default is not None and default not in self._entries:
            raise ValueError(f"default model {default!r} is not among {sorted(self._entries)}")
        order = sorted(self._entries, key=lambda n: (n != default, n != PREFERRED_DEFAULT, n))
        for name in order:
            e = self._entries[name]
            if self.default and e.bytes + self.resident_bytes() > self.budget_bytes:
                continue  # loaded on its first request
            try:
                self._load(e, "load", make_room=False)
            except UnsupportedModel as err:  # a kind of model this service does not serve: skipped, said why
                log.warning("skipping %s: %s", e.path, err)
                del self._entries[name]
                continue
            except LoadError as err:
                if self.mode == "none":  # a broken file stops the start-up, as before models could change
                    raise (err.__cause__ or err) from None  # the file's own error (CheckpointError), as before
                continue  # it shows as failed; the others serve
            if not self.default:
                self.default = name
        if not self.default:
            raise NoCheckpoints(f"no model in {Path(directory).resolve()} can be served (see the errors above)")
        self._aliases = {a: t for a, t in self._aliases.items() if t in self._entries}
        return self

    def attach(self, engine) -> None:
        """The engine that serves the resident models (``install``, ``remove``, ``busy``); starts polling."""
        self._engine = engine
        if self.mode == "poll" and self._poller is None:
            self._poller = threading.Thread(target=self._poll, name="model-poller", daemon=True)
            self._poller.start()

    def close(self) -> None:
        self._stop.set()
        self._loader.shutdown(wait=False, cancel_futures=True)

    # --- what the HTTP layer reads ------------------------------------------------------------------
    @property
    def pipelines(self) -> dict[str, Pipeline]:
        """The models on the device now."""
        with self._lock:
            return {n: e.pipe for n, e in self._entries.items() if e.pipe is not None}

    def names(self) -> list[str]:
        """The models a request may name (on the device or not)."""
        with self._lock:
            return [n for n, e in self._entries.items() if e.servable]

    def __contains__(self, name: str) -> bool:
        return name in self.names() or name in self._aliases

    def __getitem__(self, name: str) -> Pipeline:
        """The model's weights on the device now (KeyError when it is not there)."""
        pipe = self._entries[self.resolve(name)].pipe
        if pipe is None:
            raise KeyError(name)
        return pipe

    def aliases(self) -> dict[str, str]:
        """The aliases whose model can serve now."""
        with self._lock:
            return {a: t for a, t in self._aliases.items() if t in self._entries and self._entries[t].servable}

    def resolve(self, name: str | None) -> str:
        """The model a request means: the default for none, an alias's target, or the name itself
        (UnknownModel if it is none of them, or cannot serve)."""
        with self._lock:
            name = self.default if name is None else self._aliases.get(name, name)
            e = self._entries.get(name)
            if e is None or not e.servable:
                raise UnknownModel(name, self.names())
        return name

    def card(self, name: str) -> ModelCard | None:
        e = self._entries.get(name)
        return e.card if e is not None else None

    def entries(self) -> list[Entry]:
        with self._lock:
            return list(self._entries.values())

    def entry(self, name: str) -> Entry:
        with self._lock:
            if name not in self._entries:
                raise UnknownModel(name, self.names())
            return self._entries[name]

    def resident_bytes(self) -> int:
        with self._lock:
            return sum(e.bytes for e in self._entries.values() if e.pipe is not None)

    # --- leases -----------------------------------------------------------------------------------
    def lease(self, name: str) -> Lease | Future:
        """A hold on model ``name`` when it is on the device; else the future of its load (started
        here if none is under way): wait for it, call :meth:`unwait`, then ask again. UnknownModel,
        or ModelUnavailable (its last load failed and its file has not changed since)."""
        with self._lock:
            e = self._entries.get(name)
            if e is None or not e.servable:
                raise UnknownModel(name, self.names())
            e.last_used = time.time()
            if e.pipe is not None:
                e.leases += 1
                return Lease(self, name, e.pipe)
            if e.state == "failed" and e.pending is None:
                retry = max(1, int(self.poll_s)) if self.mode == "poll" and e.fixable else None
                raise ModelUnavailable(f"model {name!r} could not be loaded: {e.error}", retry_after_s=retry)
            e.waiters += 1  # a model someone waits for is not evicted the moment it arrives
            return e.pending or self._submit(e, "load")

    def unwait(self, name: str) -> None:
        with self._lock:
            e = self._entries.get(name)
            if e is not None and e.waiters > 0:
                e.waiters -= 1

    def _release(self, name: str) -> None:
        with self._lock:
            e = self._entries.get(name)
            if e is not None and e.leases > 0:
                e.leases -= 1
            self._changed.notify_all()

    # --- changes (any thread; the work runs on the loader thread) -----------------------------------
    def request_load(self, name: str) -> Future:
        """Load ``name`` now (an ``unloaded`` or failed one too)."""
        with self._lock:
            e = self.entry(name)
            if e.pipe is not None and e.state == "resident":
                done: Future = Future()
                done.set_result(None)
                return done
            if e.state in ("unloaded", "failed"):
                e.state = "available"
            return e.pending or self._submit(e, "load")

    def request_reload(self, name: str) -> Future:
        """Read ``name`` from disk again and swap it in (a load if it is not on the device)."""
        with self._lock:
            e = self.entry(name)
            if e.state in ("unloaded", "failed"):
                e.state = "available"
            return self._submit(e, "reload" if e.pipe is not None else "load")

    def request_unload(self, name: str, new_default: str | None = None) -> Future:
        """Take ``name`` out of service: no new requests; its device memory is freed once those it
        has are done. The default model only when ``new_default`` names another one."""
        with self._lock:
            e = self.entry(name)
            if name == self.default:
                if new_default is None or new_default == name:
                    raise ValueError(f"{name!r} is the default model: name another default to unload it")
                state = self.entry(new_default).state
                if state in ("unloaded", "failed"):
                    raise ValueError(f"the new default {new_default!r} cannot serve (it is {state})")
                self.default = new_default
            e.state = "unloaded"
            return self._loader.submit(self._unload, e, False)

    def _submit(self, e: Entry, kind: str) -> Future:
        if e.pipe is None:
            e.state = "loading"
        fut = self._loader.submit(self._run_load, e, kind)
        e.pending = fut
        return fut

    def _run_load(self, e: Entry, kind: str) -> None:
        try:
            self._load(e, kind)
        finally:
            with self._lock:
                if e.pending is not None and e.pending.running():
                    e.pending = None
                self._changed.notify_all()

    def _load(self, e: Entry, kind: str, make_room: bool = True) -> None:
        """Load ``e`` from its path (on the loader thread, or at start-up: ``make_room`` False) and hand
        it to the engine. On failure its old weights (if any) keep serving and the error is kept;
        raises LoadError (UnsupportedModel at start-up)."""
        started = time.perf_counter()
        path, previous = e.path, e.signature
        try:
            sig, digest = signature(path), content_hash(path)  # of what is read: a rewrite meanwhile reloads again
            need = disk_bytes(path)
            if need > self.budget_bytes:
                e.fixable = False
                raise LoadError(f"{path}: its weights take {need / 2**20:.0f} MiB, more than the whole model memory "
                                f"budget of {self.budget_bytes / 2**20:.0f} MiB (model_memory)")
            if make_room:
                self._make_room(e, need, hot=e.pipe is not None)
            pipe = self._load_fn(str(path), self.device, condition_cache_bytes=self.condition_cache_bytes)
            pipe.name = e.name
            if self._engine is not None:
                self._engine.install(e.name, pipe)  # swapped in before the engine's next admission
        except UnsupportedModel as err:
            if not make_room:
                raise  # start-up skips it, saying why
            log.warning("skipping %s: %s", path, err)
            with self._lock:
                self._entries.pop(e.name, None)
                self._changed.notify_all()
            raise LoadError(f"{path}: {err}") from err
        except Exception as err:
            message = str(err) if isinstance(err, LoadError) else f"{type(err).__name__}: {err}"
            transient = isinstance(err, LoadError) and err.transient
            with self._lock:
                e.error = message
                if e.state != "unloaded":
                    e.state = "resident" if e.pipe is not None else "available" if transient else "failed"
                if transient:
                    e.signature = previous if e.pipe is None else None  # a reload is tried again at the next scan
                self._changed.notify_all()
            self.observer.load_failed(e.name, kind)
            log.error({"event": "model_load_failed", "model": e.name, "kind": kind, "error": message,
                       "still_serving": e.pipe is not None})
            raise LoadError(message, transient) from err
        seconds = time.perf_counter() - started
        with self._lock:
            e.pipe, e.card, e.error, e.provenance = pipe, pipe.card, None, dict(pipe.provenance)
            e.state = "unloaded" if e.state == "unloaded" else "resident"  # an unload queued meanwhile follows
            e.bytes, e.load_s, e.loaded_at, e.content_hash = device_bytes(pipe), seconds, time.time(), digest
            e.last_used, e.signature, e.fixable = time.time(), sig, True
            e.loads += 1
            self._changed.notify_all()
        self.observer.declared(e.name)
        self.observer.loaded(e.name, kind, seconds, e.bytes)
        log.info({"event": "model_loaded", "model": e.name, "kind": kind, "seconds": round(seconds, 3),
                  "bytes": e.bytes, "source": pipe.card.source, "hash": digest, "device": str(self.device)})

    def _make_room(self, e: Entry, need: int, hot: bool) -> None:
        """Evict least recently used idle models until ``need`` more bytes fit (a reload keeps the old
        weights until the new ones serve, so both count). Waits up to ``room_wait_s`` for models in use
        to become idle; LoadError if they do not."""
        deadline = time.monotonic() + self.room_wait_s
        while True:
            with self._lock:
                if self.resident_bytes() + need <= self.budget_bytes:
                    return
                idle = [x for x in self._entries.values() if x.pipe is not None and x is not e and x.leases == 0
                        and x.waiters == 0 and not (self._engine is not None and self._engine.busy(x.name))]
                out = None
                if idle:
                    out = self._evict(min(idle, key=lambda x: x.last_used))
                else:
                    left = deadline - time.monotonic()
                    if hot or left <= 0:
                        raise LoadError(f"{e.path}: no room for {need / 2**20:.0f} MiB within the model memory budget "
                                        f"of {self.budget_bytes / 2**20:.0f} MiB: every other model on the device is "
                                        "in use" + (" (a reload needs room beside the old weights)" if hot else ""),
                                        transient=True)
                    self._changed.wait(min(left, 0.5))
            if out is not None:  # outside the lock: the engine's thread may need it to finish a job
                self._settle(out)

    def _evict(self, e: Entry) -> Future | None:
        """(lock held) Take an idle model off the device; it stays servable and loads again when asked.
        Returns the engine's removal (wait for it, then free, outside the lock)."""
        out = self._engine.remove(e.name) if self._engine is not None else None
        e.pipe, e.state = None, "available"
        self.observer.evicted(e.name)
        log.info({"event": "model_evicted", "model": e.name, "bytes": e.bytes})
        return out

    def _unload(self, e: Entry, forget: bool) -> None:
        """(loader thread) Wait for the requests that hold ``e`` (they finish on its weights), then free
        it; ``forget``: its files are gone, so is its name."""
        with self._lock:
            while e.leases > 0 and not self._stop.is_set():
                self._changed.wait(0.5)
            out = self._engine.remove(e.name) if self._engine is not None and e.pipe is not None else None
            had, e.pipe = e.pipe is not None, None
            if forget:
                self._entries.pop(e.name, None)
            self._changed.notify_all()  # (its state stays: unloaded, or a load asked for since, queued after this)
        if had:
            self._settle(out)
        self.observer.unloaded(e.name)
        log.info({"event": "model_unloaded", "model": e.name, "forgotten": forget})

    def _settle(self, removal: Future | None) -> None:
        """Wait for the engine to let go of a removed model, then give its memory back."""
        if removal is not None:
            try:
                removal.result(timeout=60)
            except Exception:  # the engine is gone or stuck: free what can be freed
                log.warning("the engine did not confirm a model's removal within 60 s")
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # --- the directory --------------------------------------------------------------------------
    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.scan()
            except Exception:  # a scan's failure (a vanished file) never stops the polling
                log.exception("scanning %s failed", self.directory)

    def scan(self, reload_changed: bool = True, settle: bool = True) -> None:
        """Look at the directory once: new complete models become available (and, polling, load now
        when they fit without evicting anything), changed ones on the device reload
        (``reload_changed``), removed ones are unloaded; ``aliases.json`` is read again. ``settle``: a
        folder counts as complete once it is unchanged since the previous scan (a copy in progress
        changes); False: at once (an admin says it is)."""
        try:  # the file system is read without the lock (requests take it)
            found = {model_name(p): p for p in _candidates(self.directory)}
            seen = {name: (path, signature(path)) for name, path in found.items()}
            whole = {name for name, (path, _) in seen.items() if path.is_file() and safetensors_complete(path)}
            sizes = {name: disk_bytes(path) for name, (path, _) in seen.items() if name not in self._entries}
        except OSError:
            return
        with self._lock:
            for name, (path, sig) in seen.items():
                e = self._entries.get(name)
                if e is not None and e.signature == sig:
                    self._settling.pop(name, None)
                    continue
                if name not in whole and not self._settled(name, sig, settle):
                    continue
                self._settling.pop(name, None)
                if e is None:
                    e = self._entries[name] = Entry(name, path, sig, bytes=sizes.get(name, 0))
                    self.observer.declared(name)
                    log.info({"event": "model_found", "model": name, "path": str(path)})
                    if self.mode == "poll" and e.bytes + self.resident_bytes() <= self.budget_bytes:
                        self._submit(e, "load")
                    continue
                e.path, e.signature = path, sig
                if e.state == "unloaded" or not reload_changed:
                    continue
                if e.pipe is not None:
                    log.info({"event": "model_changed", "model": name})
                    self._submit(e, "reload")
                elif e.state == "failed":
                    e.state, e.error, e.fixable = "available", None, True  # fixed: tried again at the next request
            for name in [n for n in self._entries if n not in found]:
                e = self._entries[name]
                if name == self.default:
                    others = [n for n, x in self._entries.items() if n in found and x.servable and x.state != "failed"]
                    if not others:
                        continue  # the default stays loaded when nothing else could serve
                    log.warning("default model %s was removed from %s; the default is now %s", name,
                                self.directory, others[0])
                    self.default = others[0]
                if not e.forgetting:
                    e.state, e.forgetting = "unloaded", True
                    self._loader.submit(self._unload, e, True)  # after any load of it under way
        self._read_aliases()

    def _settled(self, name: str, sig: tuple, settle: bool) -> bool:
        """Not whole (a folder, or a file still being written): complete once unchanged since the
        previous scan (a truncated file stays as it is, and its load then fails, saying why)."""
        if not settle or self._settling.get(name) == sig:
            return True
        self._settling[name] = sig
        return False

    def _read_aliases(self) -> None:
        path = self.directory / ALIASES_FILE
        try:
            sig = signature(path) if path.is_file() else None
            if sig == self._aliases_sig:
                return
            raw = json.loads(path.read_text()) if sig is not None else {}
            if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
                raise ValueError("must be a JSON object of alias name -> model name")
            with self._lock:
                bad = [f"{a} -> {t}" for a, t in raw.items() if t not in self._entries or a in self._entries]
                if bad:
                    raise ValueError(f"aliases must name a model and not be one: {', '.join(bad)}")
                self._aliases, self._aliases_sig = dict(raw), sig
            log.info({"event": "aliases", "aliases": self._aliases})
        except (OSError, ValueError) as err:  # the previous aliases stay; read again at the next scan
            log.error({"event": "aliases_invalid", "file": str(path), "error": str(err)})
