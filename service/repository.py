"""The model repository: which models exist on disk, which versions are loaded, and their states.

Control modes as Triton's: `none` loads everything at start; `poll` also rescans and reloads what changed;
`explicit` loads only what `load_model` names and what the load/unload API asks for. A model that fails to
load shows UNAVAILABLE with its reason while every other model keeps serving; a failed *re*load keeps the
versions that were serving.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from service.ensemble import EnsembleVersion, StepRunner, composing_models, is_ensemble
from service.errors import InvalidInput, ModelLoadError, ModelNotFound, ModelNotReady, ServingError
from service.model import LoadRequest, ModelVersion
from service.modelrepo import layout, overrides, remote
from service.modelrepo.config import read_config, select_versions
from service.modelrepo.overrides import LoadOverride
from service.ports import StartupError
from service.settings import ServerSettings

log = logging.getLogger("modelserve.repository")

READY, UNAVAILABLE, LOADING, UNLOADING = "READY", "UNAVAILABLE", "LOADING", "UNLOADING"


@dataclass
class ModelEntry:
    """One model folder and what is loaded from it."""

    name: str
    versions: dict[str, ModelVersion] = field(default_factory=dict)
    state: str = UNAVAILABLE
    reason: str = "unloaded"
    fingerprint: tuple = ()
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Should be loaded: asked to load (at start, by poll or the API) and not unloaded since. Strict readiness
    # waits for every such model to be READY.
    wanted: bool = False
    # The temporary model folder of a load with file overrides (service/modelrepo/overrides.py).
    override_dir: Path | None = None
    # Loaded only because an ensemble needed it (Triton: "loaded along with" the ensemble): unloading that
    # ensemble with `unload_dependents` unloads this model too, unless another loaded ensemble still uses it.
    implicit: bool = False

    def latest(self) -> ModelVersion | None:
        if not self.versions:
            return None
        return self.versions[max(self.versions, key=int)]


class ModelRepository:
    """Loads, swaps and unloads models; lookups never await, so a swap cannot split a request."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        # An object-storage repository (s3://...) is mirrored into a local folder and served from there.
        self.remote_url = settings.model_repository if isinstance(settings.model_repository, str) else None
        self._own_cache: Path | None = None
        if self.remote_url is None:
            self.root = Path(settings.model_repository)
        elif settings.repository_cache_dir is not None:
            self.root = settings.repository_cache_dir
        else:
            self.root = self._own_cache = Path(tempfile.mkdtemp(prefix="modelserve-repository-"))
        self.entries: dict[str, ModelEntry] = {}
        self._background: set[asyncio.Task] = set()
        self._poller: asyncio.Task | None = None
        # Runs one ensemble step through the core (set by InferenceCore); ensembles cannot load without it.
        self.step_runner: StepRunner | None = None
        self._loading_ensembles: set[str] = set()

    def scan(self) -> dict[str, Path]:
        """Model folders on disk (see service.modelrepo.layout.scan)."""
        return layout.scan(self.root)

    async def sync_remote(self) -> None:
        """Mirror an object-storage repository into the local cache (a no-op for a local repository)."""
        if self.remote_url is not None:
            changed = await asyncio.to_thread(remote.sync, self.remote_url, self.root)
            if changed:
                log.info("object storage: %s changed in %s", changed, self.remote_url)

    async def start(self) -> None:
        try:
            await self.sync_remote()
        except ServingError as exc:  # an unreachable bucket at start: one line from `modelserve`, no traceback
            raise StartupError(exc.message) from exc
        on_disk = self.scan()
        for name in on_disk:
            self.entries.setdefault(name, ModelEntry(name))
        mode = self.settings.model_control_mode
        wanted = list(on_disk)
        if mode == "explicit":
            wanted = list(on_disk) if "*" in self.settings.load_model else self.settings.load_model
        # Composing models before the ensembles that call them.
        failed = []
        for name in sorted(wanted, key=lambda n: self._is_ensemble(on_disk.get(n))):
            try:
                await self.load(name)
            except ServingError as exc:
                log.error("model %s failed to load: %s", name, exc.message)
                failed.append(f"{name}: {exc.message}")
        if failed and self.settings.exit_on_error:
            await self.close(grace_s=0.0)
            raise StartupError(f"{len(failed)} model(s) failed to load and exit_on_error is set "
                               f"(--exit-on-error=false serves the others): {'; '.join(failed)}")
        if mode == "poll":
            self._poller = asyncio.create_task(self._poll_forever(), name="repository-poll")

    async def load(self, name: str, override: LoadOverride | None = None, *, along_with: bool = False) -> None:
        """(Re)load a model from disk (or from a load request's override); new versions serve before the old
        ones drain. `along_with`: loaded because an ensemble being loaded calls it, not asked for by name."""
        model_dir = layout.model_dir(self.root, name)
        if (override is None or not override.files) and not layout.is_model_folder(model_dir):
            raise ModelNotFound(f"failed to load {name!r}: no model {name!r} in the model repository; found "
                                f"{sorted(self.scan())}")
        entry = self.entries.setdefault(name, ModelEntry(name))
        entry.implicit = along_with and (entry.implicit or not entry.wanted)
        entry.wanted = True
        async with entry.lock:
            temp = await asyncio.to_thread(overrides.materialize, override, name=name) \
                if override is not None and override.files else None
            fingerprint = await asyncio.to_thread(layout.fingerprint, model_dir)
            if not entry.versions:
                entry.state, entry.reason = LOADING, ""
            try:
                loaded = await self._load_versions(name, temp or model_dir, override)
            except ServingError as exc:
                overrides.discard(temp)
                self._mark_failed(entry, exc.message)
                entry.fingerprint = fingerprint
                raise
            except Exception as exc:  # an unexpected bug in one model must not take the others down
                overrides.discard(temp)
                log.exception("model %s: unexpected load failure", name)
                self._mark_failed(entry, f"{type(exc).__name__}: {exc}")
                entry.fingerprint = fingerprint
                raise ModelLoadError(f"model {name!r} failed to load: {exc}") from exc
            old = entry.versions
            for mv in loaded.values():
                mv.start()
            entry.versions, entry.state, entry.reason, entry.fingerprint = loaded, READY, "", fingerprint
            overrides.discard(entry.override_dir)
            entry.override_dir = temp
            self._drain(list(old.values()))
            log.info("model %s ready: versions %s", name, sorted(loaded, key=int))

    @staticmethod
    def _is_ensemble(model_dir: Path | None) -> bool:
        try:
            return model_dir is not None and is_ensemble(read_config(model_dir)[0])
        except ServingError:
            return False

    def _mark_failed(self, entry: ModelEntry, reason: str) -> None:
        if entry.versions:
            entry.reason = f"reload failed, still serving versions {sorted(entry.versions, key=int)}: {reason}"
        else:
            entry.state, entry.reason = UNAVAILABLE, reason
        log.error("model %s: %s", entry.name, entry.reason)

    async def _load_versions(self, name: str, model_dir: Path,
                             override: LoadOverride | None = None) -> dict[str, ModelVersion]:
        if override is not None:
            config, has_file, mbs_given = override.config, True, override.max_batch_size_given
        else:
            config, has_file, mbs_given = read_config(model_dir)
        if is_ensemble(config):
            return await self._load_ensemble(LoadRequest(name, model_dir, config, has_file, mbs_given))
        available = layout.disk_versions(model_dir)
        if not available:
            raise ModelLoadError(f"model {name!r}: no numeric version folder (e.g. {name}/1/model.onnx)")
        versions = select_versions(config, available)
        request = LoadRequest(name, model_dir, config, has_file, mbs_given)
        loaded = {}
        for v in versions:
            loaded[str(v)] = await asyncio.to_thread(ModelVersion.load, request, version=v, settings=self.settings)
        return loaded

    async def _load_ensemble(self, request: LoadRequest) -> dict[str, ModelVersion]:
        """Load the composing models that are not serving yet, then the ensemble (Triton: no version file,
        at most an empty `1/`)."""
        config = request.config
        assert isinstance(config, mc.ModelConfig) and self.step_runner is not None
        self._loading_ensembles.add(request.name)
        try:
            for dep in composing_models(config):
                if dep in self._loading_ensembles:
                    raise ModelLoadError(f"ensemble {request.name!r}: step model {dep!r} leads back to "
                                         f"{request.name!r}; ensembles cannot form a cycle")
                entry = self.entries.get(dep)
                if (entry is None or not entry.versions) and layout.is_model_folder(self.root / dep):
                    try:
                        await self.load(dep, along_with=True)
                    except ServingError:
                        pass  # the ensemble's load says which step cannot serve, and why
        finally:
            self._loading_ensembles.discard(request.name)
        versions = select_versions(config, layout.disk_versions(request.model_dir) or [1])
        return {str(v): EnsembleVersion.load_ensemble(request, version=v, lookup=self.get, runner=self.step_runner,
                                                      settings=self.settings) for v in versions}

    def _drain(self, versions: list[ModelVersion]) -> None:
        for mv in versions:
            task = asyncio.create_task(mv.close(grace_s=self.settings.unload_grace_secs))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def unload(self, name: str, *, unload_dependents: bool = False) -> None:
        """Unload every version of `name`; with `unload_dependents` (Triton's unload parameter) also the models
        it calls that were loaded along with it and that no other loaded ensemble calls."""
        entry = self.entries.get(name)
        if entry is None:
            raise ModelNotFound(f"unknown model {name!r}; known models are {sorted(self.entries)}")
        calls = self._calls(entry)
        await self._unload_entry(entry)
        if unload_dependents:
            for dep in calls:
                dep_entry = self.entries.get(dep)
                if dep_entry is not None and dep_entry.implicit and dep_entry.versions \
                        and not any(dep in self._calls(e) for e in self.entries.values()):
                    log.info("model %s: unloading with %s (loaded along with it)", dep, name)
                    await self.unload(dep, unload_dependents=True)

    @staticmethod
    def _calls(entry: ModelEntry) -> set[str]:
        """The models the loaded versions of an ensemble call (empty for any other model)."""
        return {dep for mv in entry.versions.values() if is_ensemble(mv.spec.config)
                for dep in composing_models(mv.spec.config)}

    async def _unload_entry(self, entry: ModelEntry) -> None:
        name = entry.name
        entry.wanted = entry.implicit = False
        async with entry.lock:
            old = list(entry.versions.values())
            entry.versions, entry.state, entry.reason = {}, UNLOADING, ""
            await asyncio.gather(*(mv.close(grace_s=self.settings.unload_grace_secs) for mv in old))
            entry.state, entry.reason = UNAVAILABLE, "unloaded"
            overrides.discard(entry.override_dir)
            entry.override_dir = None
        if not (self.root / name).is_dir():
            self.entries.pop(name, None)

    def get(self, name: str, version: str | None = None) -> ModelVersion:
        """The READY version asked for (latest if none); never awaits."""
        entry = self.entries.get(name)
        if entry is None:
            raise ModelNotFound(f"Request for unknown model: {name!r} is not found; available models are "
                                f"{sorted(self.entries)}")
        if version:
            if not (version.isascii() and version.isdigit()):
                # NOTE: Triton's words (its example clients match them), then what is expected.
                raise InvalidInput(f"failed to get model version from specified version string {version!r}: "
                                   "expected a version number, or no version for the latest")
            mv = entry.versions.get(version)
            if mv is None:
                if entry.versions:
                    raise ModelNotFound(
                        f"Request for unknown model: {name!r} version {version} is not found; loaded versions "
                        f"are {sorted(entry.versions, key=int)}"
                    )
                raise ModelNotReady(_not_ready(name, entry, version=version))
            return _serving(mv)
        mv = entry.latest()
        if mv is None:
            raise ModelNotReady(_not_ready(name, entry))
        return _serving(mv)

    def index(self, *, ready_only: bool = False) -> list[dict]:
        rows: list[dict] = []
        for name in sorted(self.entries):
            entry = self.entries[name]
            if entry.versions:
                for v in sorted(entry.versions, key=int):
                    why = _ensemble_unavailable(entry.versions[v])
                    if why is None or not ready_only:
                        rows.append({"name": name, "version": v, "state": UNAVAILABLE if why else READY,
                                     "reason": why or entry.reason})
            elif not ready_only:
                rows.append({"name": name, "state": entry.state, "reason": entry.reason})
        return rows

    def all_ready(self) -> bool:
        """Every model that should be loaded is READY; in mode none/poll there must be at least one."""
        wanted = [e for e in self.entries.values() if e.wanted]
        if not wanted and self.settings.model_control_mode != "explicit":
            return False
        return all(e.state == READY and e.versions for e in wanted)

    def ready_versions(self) -> list[ModelVersion]:
        return [mv for e in self.entries.values() for mv in e.versions.values()]

    async def poll_once(self) -> None:
        """Load new or changed models and unload removed ones."""
        await self.sync_remote()
        on_disk = await asyncio.to_thread(self.scan)
        for name in [n for n in self.entries if n not in on_disk and self.entries[n].versions]:
            log.info("model %s removed from the repository; unloading", name)
            await self.unload(name)
        for name, model_dir in on_disk.items():
            entry = self.entries.get(name)
            if entry is not None and entry.fingerprint == await asyncio.to_thread(layout.fingerprint, model_dir):
                continue
            log.info("model %s is new or changed; loading", name)
            try:
                await self.load(name)
            except ServingError:
                pass  # recorded in the index by load()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.repository_poll_secs)
            try:
                await self.poll_once()
            except Exception:  # keep polling: one bad scan must not stop future ones
                log.exception("repository poll failed")

    async def close(self, *, grace_s: float) -> None:
        """Stop polling, then close every version (and those still draining) within `grace_s`: the server
        calls this once the transports have drained, so the batchers normally have nothing left to do."""
        self.stop_polling()
        closing = [mv.close(grace_s=grace_s) for entry in self.entries.values() for mv in entry.versions.values()]
        for entry in self.entries.values():
            entry.versions = {}
        await asyncio.gather(*closing)
        if self._background:  # replaced versions still draining
            await asyncio.wait(set(self._background), timeout=grace_s)
        for entry in self.entries.values():
            overrides.discard(entry.override_dir)
            entry.override_dir = None
        if self._own_cache is not None:
            shutil.rmtree(self._own_cache, ignore_errors=True)

    def stop_polling(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None


def _ensemble_unavailable(mv: ModelVersion) -> str | None:
    return mv.unavailable_reason() if isinstance(mv, EnsembleVersion) else None


def _serving(mv: ModelVersion) -> ModelVersion:
    """`mv`, unless it is an ensemble one of whose composing models cannot serve (Triton: UNAVAILABLE)."""
    why = _ensemble_unavailable(mv)
    if why is not None:
        raise ModelNotReady(f"ensemble {mv.name!r} is not ready: {why}")
    return mv


def _not_ready(name: str, entry: ModelEntry, *, version: str | None = None) -> str:
    # NOTE: Triton's words first (qa/L0_lifecycle checks that its messages start with them), then ours. Triton
    # answers NOT_FOUND here; 503 / UNAVAILABLE is kept, as it tells a client to retry while a model loads.
    triton = (f"Request for unknown model: {name!r} version {version} is not at ready state" if version
              else f"Request for unknown model: {name!r} has no available versions")
    # An entry's reason is empty while it loads or unloads: say which ("UNLOADING: loading" before).
    return f"{triton}: model {name!r} is not ready ({entry.state}: {entry.reason or entry.state.lower()})"
