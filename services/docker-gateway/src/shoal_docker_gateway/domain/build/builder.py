"""The classic builder's run of a Dockerfile: stages, one step per instruction, the cache,
and the progress lines the docker CLI prints (see the package's docstring for the
design)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import posixpath
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from shoal_cli.cri_client import Cri, namespaced_channel
from shoal_common.clients import Clients
from shoal_common.errors import ErrorCode, ShoalError
from shoal_common.messages.images import (
    ContentInfoRequest,
    ImageGetRequest,
    ImageListRequest,
    ImageRemoveRequest,
    RegistryAuth,
)
from shoal_common.messages.namespaces import check_namespace
from shoal_common.messages.snapshots import Mount, SnapshotKeyRequest, SnapshotListRequest

from shoal_docker_gateway.domain import images_pull, paths
from shoal_docker_gateway.domain.backend import Backend
from shoal_docker_gateway.domain.build import context as ctx
from shoal_docker_gateway.domain.build import instructions as ins_
from shoal_docker_gateway.domain.build.commit import (
    BUILD_REPO,
    VIEW_PREFIX,
    Data,
    Image,
    Images,
    from_info,
    import_image,
    scratch,
)
from shoal_docker_gateway.domain.build.diff import overlay_diff, tree_diff
from shoal_docker_gateway.domain.build.dockerfile import (
    Dockerfile,
    Instruction,
    parse,
    parse_line,
)
from shoal_docker_gateway.domain.build.errors import BuildError
from shoal_docker_gateway.domain.build.layers import (
    CopyPlan,
    NewLayer,
    chown_ids,
    workdir_layer,
    write_copy,
    write_layer,
)
from shoal_docker_gateway.domain.build.run import (
    BUILD_LABEL,
    OWNER_LABEL,
    RunSpec,
    describe,
    new_id,
    overlay_dirs,
    run,
    stale,
    sweep,
)
from shoal_docker_gateway.domain.build.words import expand, expand_words
from shoal_docker_gateway.domain.images_names import _NAMES
from shoal_docker_gateway.domain.images_refs import Ref, familiar
from shoal_docker_gateway.domain.images_refs import parse as parse_ref
from shoal_docker_gateway.errors import BadParameter, Conflict, from_exception
from shoal_docker_gateway.store.build_cache import BuildCache

log = structlog.get_logger("shoal.docker.build")

# Builds running in this gateway: what a sweep of left-over pods and views must keep.
ACTIVE: set[str] = set()
PROXY_ARGS = frozenset({"HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy",
                        "FTP_PROXY", "ftp_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY",
                        "all_proxy"})
_STAGE_NAME = re.compile(r"\A[a-z][a-z0-9_.-]*\Z")
_URL = re.compile(r"\A[a-z][a-z0-9+.-]*://", re.I)

Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class BuildOptions:
    tags: list[Ref] = field(default_factory=list)
    dockerfile: str = "Dockerfile"
    build_args: dict[str, str | None] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    nocache: bool = False
    quiet: bool = False
    target: str = ""
    pull: bool = False
    platform: str = ""
    auths: dict[str, RegistryAuth] = field(default_factory=dict)
    run: RunSpec = field(default_factory=lambda: RunSpec([], {}))


@dataclass
class Stage:
    name: str
    image: Image
    args: dict[str, str | None] = field(default_factory=dict)  # ARGs declared in it
    cmd_set: bool = False  # a CMD in this stage (ENTRYPOINT then keeps it)
    key: str = ""  # the cache key of the step being run


def build_namespace(backend: Backend) -> str:
    return check_namespace(f"{backend.namespace}-build", "the build namespace")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _short(image_id: str) -> str:
    return image_id.removeprefix("sha256:")[:12]


def _split(instructions: list[Instruction]) -> tuple[list[Instruction],
                                                      list[list[Instruction]]]:
    """(ARGs before the first FROM, the stages: each a FROM and what follows it)."""
    meta: list[Instruction] = []
    stages: list[list[Instruction]] = []
    for ins in instructions:
        if ins.cmd == "FROM":
            stages.append([ins])
        elif stages:
            stages[-1].append(ins)
        elif ins.cmd == "ARG":
            meta.append(ins)
        else:
            raise BuildError(f"Dockerfile parse error line {ins.line}: {ins.cmd} before "
                             "the first FROM (only ARG may come before it)")
    if not stages:
        raise BuildError("the Dockerfile has no FROM: no build stage in current context")
    return meta, stages


def _label_text(labels: dict[str, str]) -> str:
    return " ".join(f"{json.dumps(k)}={json.dumps(v)}" for k, v in sorted(labels.items()))


class Builder:
    def __init__(self, backend: Backend, options: BuildOptions, send: Send,
                 work: ctx.WorkDir, build_id: str, cri: Cri) -> None:
        self.backend, self.options, self.send = backend, options, send
        self.work, self.build_id, self.cri = work, build_id, cri
        self.namespace = build_namespace(backend)
        self.clients = Clients(backend.bus, namespace=self.namespace)
        self.images = Images(self.clients, build_id, work.empty)
        self.cache = BuildCache(backend.records)
        self.stages: list[Stage] = []
        self.meta_args: dict[str, str | None] = {}
        self.consumed: set[str] = set()
        self.escape = "\\"
        self.step = 0
        self.total = 0

    async def say(self, text: str) -> None:
        if not self.options.quiet:
            await self.send({"stream": text})

    # -- the run -------------------------------------------------------------------------

    def _to_target(self, stages: list[list[Instruction]]) -> list[list[Instruction]]:
        if not self.options.target:
            return stages
        wanted = self.options.target.lower()
        for i, block in enumerate(stages):
            words = block[0].args.split()
            if len(words) == 3 and words[1].lower() == "as" and words[2].lower() == wanted:
                return stages[:i + 1]
        raise BuildError(f"failed to reach build target {self.options.target} in Dockerfile")

    async def run(self, dockerfile: Dockerfile) -> Image:
        self.escape = dockerfile.escape
        meta, stages = _split(dockerfile.instructions)
        stages = self._to_target(stages)
        if self.options.labels:
            last = stages[-1][-1]
            stages[-1].append(Instruction("LABEL", _label_text(self.options.labels),
                                          last.line, "LABEL " +
                                          _label_text(self.options.labels)))
        self.total = len(meta) + sum(len(block) for block in stages)
        for ins in meta:
            await self._header(ins)
            self._meta_arg(ins)
        for block in stages:
            await self._header(block[0])
            await self._from(block[0])
            for ins in block[1:]:
                await self._header(ins)
                await self._dispatch(ins)
        return self.stages[-1].image

    async def _header(self, ins: Instruction) -> None:
        self.step += 1
        await self.say(f"Step {self.step}/{self.total} : {ins.original}\n")

    async def _dispatch(self, ins: Instruction) -> None:
        stage = self.stages[-1]
        await _HANDLERS[ins.cmd](self, stage, ins)
        await self.say(f" ---> {_short(stage.image.id)}\n")

    # -- variables -----------------------------------------------------------------------

    def _resolve_arg(self, name: str, default: str | None) -> str | None:
        self.consumed.add(name)
        given = self.options.build_args.get(name)
        if given is not None:
            return given
        return default

    def _meta_arg(self, ins: Instruction) -> None:
        env = {k: v for k, v in self.meta_args.items() if v is not None}
        for name, default in ins_.args_of(ins, env, self.escape):
            self.meta_args[name] = self._resolve_arg(name, default)

    def _env(self, stage: Stage) -> dict[str, str]:
        """What `$VAR` means in the stage: its ARGs, overridden by the image's Env."""
        values = {k: v for k, v in stage.args.items() if v is not None}
        return {**values, **ins_.env_map(stage.image.inner)}

    def _expand(self, stage: Stage, text: str) -> str:
        return expand(text, self._env(stage), self.escape)

    # -- the cache and commits -----------------------------------------------------------

    async def _cached(self, stage: Stage, created_by: str, inputs: str = "") -> bool:
        parent = stage.image.id or "scratch"
        stage.key = hashlib.sha256(json.dumps([parent, created_by, inputs]).encode()
                                   ).hexdigest()
        if self.options.nocache:
            return False
        image_id = await self.cache.get(stage.key)
        if image_id is None:
            return False
        found = await self.images.find(image_id)
        if found is None:
            await self.cache.delete(stage.key)
            return False
        await self.say(" ---> Using cache\n")
        stage.image = found
        return True

    async def _commit(self, stage: Stage, image: Image, created_by: str,
                      layer: NewLayer | None = None) -> None:
        ins_.history(image.config, _now(), created_by, empty=layer is None)
        image.inner["Image"] = stage.image.id
        stage.image = await self.images.commit(image, layer)
        await self.cache.put(stage.key, stage.image.id)

    async def _nop(self, stage: Stage, text: str, change: Callable[[Image], None],
                   inputs: str = "") -> None:
        """A step that changes only the config."""
        created_by = ins_.NOP + text
        if await self._cached(stage, created_by, inputs):
            return
        image = stage.image.derive()
        change(image)
        await self._commit(stage, image, created_by)

    def _layer_path(self) -> Path:
        return self.work.layers / f"{uuid.uuid4().hex}.tar.gz"

    # -- FROM ----------------------------------------------------------------------------

    def _stage_named(self, ref: str, *, index: bool) -> Stage | None:
        for i, stage in enumerate(self.stages):
            if (stage.name and stage.name == ref.lower()) or (index and ref == str(i)):
                return stage
        return None

    def _auth(self, ref: Ref) -> RegistryAuth | None:
        host = ref.repository.split("/", 1)[0]
        return self.options.auths.get(host)

    async def _pulled(self, text: str, platform: str) -> Image:
        """The image `text` names, pulled first if the node lacks it (or with `pull`)."""
        try:
            ref = parse_ref(text, "FROM image")
        except BadParameter as exc:
            raise BuildError(exc.message) from None
        request = ImageGetRequest(ref=str(ref), with_config=True)
        if not self.options.pull:
            try:
                return from_info(await self.backend.clients.images.get(request))
            except ShoalError as exc:
                if exc.code != ErrorCode.NOT_FOUND:
                    raise
        async for message in images_pull.pull(self.backend, ref, self._auth(ref),
                                              platform or self.options.platform):
            if not self.options.quiet:
                await self.send(message)
        return from_info(await self.backend.clients.images.get(request))

    async def _from(self, ins: Instruction) -> None:
        env = {k: v for k, v in self.meta_args.items() if v is not None}
        words = expand_words(ins.args, env, self.escape)
        name = ""
        if len(words) == 3 and words[1].lower() == "as":
            name = words[2].lower()
            if not _STAGE_NAME.match(name):
                raise BuildError(f"invalid name for build stage: {words[2]!r}, name can't "
                                 "start with a number or contain symbols")
        elif len(words) != 1:
            raise BuildError("FROM requires either one or three arguments")
        base = self._stage_named(words[0], index=False)
        if base is not None:
            image = base.image
        elif words[0].lower() == "scratch":
            image = scratch()
        else:
            image = await self._pulled(words[0], expand(ins.flags.get("platform", ""),
                                                         env, self.escape))
        stage = Stage(name, image)
        self.stages.append(stage)
        if image.id:
            await self.say(f" ---> {_short(image.id)}\n")
        await self._triggers(stage)

    async def _triggers(self, stage: Stage) -> None:
        """The base image's ONBUILD instructions, run first; the new image has none."""
        triggers = stage.image.inner.get("OnBuild") or []
        if not triggers:
            return
        # As dockerd: the new image has none (the next commit carries that), then they run.
        image = stage.image.derive()
        image.inner["OnBuild"] = None
        stage.image = image
        await self.say(f"# Executing {len(triggers)} build trigger"
                       f"{'s' if len(triggers) > 1 else ''}\n")
        for text in triggers:
            ins = parse_line(str(text))
            await _HANDLERS[ins.cmd](self, stage, ins)

    # -- metadata instructions -----------------------------------------------------------

    async def _env_step(self, stage: Stage, ins: Instruction) -> None:
        items = ins_.pairs(ins, self._env(stage), self.escape)

        def change(image: Image) -> None:
            for key, value in items:
                ins_.set_env(image.inner, key, value)

        await self._nop(stage, " ENV " + " ".join(f"{k}={v}" for k, v in items), change)

    async def _label(self, stage: Stage, ins: Instruction) -> None:
        items = ins_.pairs(ins, self._env(stage), self.escape)

        def change(image: Image) -> None:
            labels = dict(image.inner.get("Labels") or {})
            labels.update(items)
            image.inner["Labels"] = labels

        await self._nop(stage, " LABEL " + " ".join(f"{k}={v}" for k, v in items), change)

    async def _arg(self, stage: Stage, ins: Instruction) -> None:
        declared = ins_.args_of(ins, self._env(stage), self.escape)
        for name, default in declared:
            value = self._resolve_arg(name, default)
            stage.args[name] = value if value is not None else self.meta_args.get(name)
        text = " ".join(n + (f"={d}" if d is not None else "") for n, d in declared)
        # The values are not in the key (as in dockerd): a RUN that sees them names them.
        await self._nop(stage, f" ARG {text}", lambda image: None)

    async def _user(self, stage: Stage, ins: Instruction) -> None:
        user = self._expand(stage, ins.args.strip())
        if not user:
            raise BuildError("USER requires exactly one argument")
        await self._nop(stage, f" USER {user}", lambda i: i.inner.__setitem__("User", user))

    async def _expose(self, stage: Stage, ins: Instruction) -> None:
        ports = ins_.ports(expand_words(ins.args, self._env(stage), self.escape))
        if not ports:
            raise BuildError("EXPOSE requires at least one argument")

        def change(image: Image) -> None:
            exposed = dict(image.inner.get("ExposedPorts") or {})
            exposed.update({p: {} for p in ports})
            image.inner["ExposedPorts"] = exposed

        await self._nop(stage, " EXPOSE " + " ".join(ports), change)

    async def _volume(self, stage: Stage, ins: Instruction) -> None:
        paths_ = ins_.volumes(ins, self._env(stage), self.escape)

        def change(image: Image) -> None:
            volumes = dict(image.inner.get("Volumes") or {})
            volumes.update({p: {} for p in paths_})
            image.inner["Volumes"] = volumes

        await self._nop(stage, " VOLUME " + ins_.quoted(paths_), change)

    async def _cmd(self, stage: Stage, ins: Instruction) -> None:
        argv = ins_.command(ins, ins_.shell_of(stage.image.inner))
        stage.cmd_set = True
        await self._nop(stage, " CMD " + ins_.quoted(argv),
                        lambda i: i.inner.__setitem__("Cmd", argv))

    async def _entrypoint(self, stage: Stage, ins: Instruction) -> None:
        argv = ins_.command(ins, ins_.shell_of(stage.image.inner))
        keep_cmd = stage.cmd_set

        def change(image: Image) -> None:
            image.inner["Entrypoint"] = argv
            if not keep_cmd:  # dockerd: a new ENTRYPOINT drops the base image's CMD
                image.inner["Cmd"] = None

        await self._nop(stage, " ENTRYPOINT " + ins_.quoted(argv), change,
                        inputs=str(keep_cmd))

    async def _shell(self, stage: Stage, ins: Instruction) -> None:
        if not ins.exec_form:
            raise BuildError("SHELL requires the arguments to be in JSON form")
        shell = list(ins.exec_form)
        await self._nop(stage, " SHELL " + ins_.quoted(shell),
                        lambda i: i.inner.__setitem__("Shell", shell))

    async def _stopsignal(self, stage: Stage, ins: Instruction) -> None:
        signal = self._expand(stage, ins.args.strip())
        if not signal:
            raise BuildError("STOPSIGNAL requires exactly one argument")
        await self._nop(stage, f" STOPSIGNAL {signal}",
                        lambda i: i.inner.__setitem__("StopSignal", signal))

    async def _maintainer(self, stage: Stage, ins: Instruction) -> None:
        author = ins.args.strip()
        await self._nop(stage, f" MAINTAINER {author}",
                        lambda i: i.config.__setitem__("author", author))

    async def _onbuild(self, stage: Stage, ins: Instruction) -> None:
        trigger = ins_.trigger(ins)

        def change(image: Image) -> None:
            image.inner["OnBuild"] = [*(image.inner.get("OnBuild") or []), trigger]

        await self._nop(stage, f" ONBUILD {trigger}", change)

    async def _healthcheck(self, stage: Stage, ins: Instruction) -> None:
        check = ins_.healthcheck(ins)
        await self._nop(stage, " HEALTHCHECK " + json.dumps(check, sort_keys=True),
                        lambda i: i.inner.__setitem__("Healthcheck", check))

    # -- WORKDIR, RUN, COPY, ADD ---------------------------------------------------------

    async def _workdir(self, stage: Stage, ins: Instruction) -> None:
        path = self._expand(stage, ins.args.strip())
        if not path:
            raise BuildError("WORKDIR requires exactly one argument")
        base = str(stage.image.inner.get("WorkingDir") or "/")
        full = posixpath.normpath(posixpath.join(base, path))
        created_by = f"{ins_.NOP}WORKDIR {full}"
        if await self._cached(stage, created_by):
            return
        image = stage.image.derive()
        image.inner["WorkingDir"] = full
        async with self.images.view(stage.image) as root:
            layer = await asyncio.to_thread(workdir_layer, self._layer_path(), root, full)
        await self._commit(stage, image, created_by, layer)

    def _run_env(self, stage: Stage) -> tuple[dict[str, str], str]:
        """The build args a RUN sees (not those ENV overrides), and the history prefix
        naming them (`|2 A=1 B=2 `; proxies are left out of it, as dockerd does)."""
        env = ins_.env_map(stage.image.inner)
        declared = {k: v for k, v in stage.args.items() if v is not None and k not in env}
        proxies = {k: v for k, v in self.options.build_args.items()
                   if k in PROXY_ARGS and v is not None and k not in declared}
        shown = {k: v for k, v in sorted(declared.items()) if k not in PROXY_ARGS}
        prefix = f"|{len(shown)} " + " ".join(f"{k}={v}" for k, v in shown.items()) + " " \
            if shown else ""
        return {**proxies, **declared}, prefix

    async def _run(self, stage: Stage, ins: Instruction) -> None:
        argv = ins_.command(ins, ins_.shell_of(stage.image.inner))
        env, prefix = self._run_env(stage)
        created_by = prefix + describe(argv)
        if await self._cached(stage, created_by):
            return
        if not stage.image.layers:
            raise BuildError("RUN needs a filesystem: the image has no layers (FROM scratch)")
        parent = await self.images.adopt(stage.image)
        template = self.options.run
        spec = RunSpec(argv, env, template.network, template.memory, template.cpu_shares,
                       template.cpu_period, template.cpu_quota, template.cpuset_cpus,
                       template.cpuset_mems,
                       {BUILD_LABEL: self.build_id, OWNER_LABEL: str(os.getpid())})
        log_root = Path(self.backend.config.docker.log_root)
        async with run(self.cri, self.clients.snapshots, self.namespace, log_root,
                       parent.name, spec, self.say) as mounts:
            layer = await self._diff(parent, mounts)
        await self._commit(stage, parent.derive(), created_by, layer)

    async def _diff(self, parent: Image, mounts: list[Mount]) -> NewLayer:
        if len(mounts) != 1:
            raise BuildError(f"the RUN container's rootfs is {len(mounts)} mounts, not one")
        path = self._layer_path()
        dirs = overlay_dirs(mounts[0])
        if dirs is not None:
            upper, lowers = dirs
            return await asyncio.to_thread(write_layer, path,
                                           lambda w: overlay_diff(w, upper, lowers))
        if mounts[0].type != "bind":
            raise BuildError(f"the RUN container's rootfs is a {mounts[0].type} mount, which "
                             "the build cannot read changes from")
        new = Path(mounts[0].source)
        async with self.images.view(parent) as old:
            return await asyncio.to_thread(write_layer, path, lambda w: tree_diff(w, new, old))

    @contextlib.asynccontextmanager
    async def _source_root(self, stage: Stage, ins: Instruction) -> AsyncIterator[Path]:
        """Where COPY reads: the context, or the tree of --from's stage or image."""
        source = self._expand(stage, ins.flags.get("from", ""))
        if not source:
            yield self.work.context
            return
        earlier = self._stage_named(source, index=True)
        if earlier is stage:
            raise BuildError(f"COPY --from={source} names the stage it is in")
        image = earlier.image if earlier is not None else await self._pulled(source, "")
        async with self.images.view(image) as root:
            yield root

    def _destination(self, stage: Stage, dest: str) -> tuple[str, bool]:
        """The absolute destination, and whether it names a directory."""
        is_dir = dest.endswith(("/", "/.")) or dest in (".", "")
        base = str(stage.image.inner.get("WorkingDir") or "/")
        full = posixpath.normpath(posixpath.join(base, dest))
        return full, is_dir or full == "/"

    async def _copy(self, stage: Stage, ins: Instruction) -> None:
        env = self._env(stage)
        words = [expand(w, env, self.escape) for w in ins.exec_form] \
            if ins.exec_form is not None else expand_words(ins.args, env, self.escape)
        if len(words) < 2:
            raise BuildError(f"{ins.cmd} requires at least two arguments, but only one was "
                             "provided. Destination could not be determined.")
        *patterns, dest_text = words
        if ins.cmd == "ADD" and any(_URL.match(p) for p in patterns):
            raise BuildError("ADD from a URL is not supported by Shoal's builder: download "
                             "it in a RUN step, or put it in the build context")
        dest, is_dir = self._destination(stage, dest_text)
        chown = self._expand(stage, ins.flags.get("chown", ""))
        async with self._source_root(stage, ins) as root:
            try:
                found = await asyncio.to_thread(ctx.sources, root, patterns, ins.cmd)
                digest = await asyncio.to_thread(ctx.digest_sources, found)
            except OSError as exc:
                raise BuildError(f"{ins.cmd} failed: {exc}") from None
            if len(found) > 1 and not is_dir:
                raise BuildError(f"When using {ins.cmd} with more than one source file, the "
                                 "destination must be a directory and end with a /")
            kind = "multi" if len(found) > 1 else "dir" if found[0].is_dir else "file"
            shown = dest + ("/" if is_dir and dest != "/" else "")
            created_by = f"{ins_.NOP}{ins.cmd} {kind}:{digest} in {shown} "
            if await self._cached(stage, created_by, f"{chown}\0{ins.flags.get('from', '')}"):
                return
            async with self.images.view(stage.image) as image_root:
                ids = chown_ids(image_root, chown) if chown else (0, 0)
                plan = CopyPlan(found, dest, is_dir, ids, unpack_archives=ins.cmd == "ADD")
                try:
                    layer = await asyncio.to_thread(
                        write_layer, self._layer_path(),
                        lambda w: write_copy(w, plan, image_root))
                except OSError as exc:
                    raise BuildError(f"{ins.cmd} failed: {exc}") from None
        await self._commit(stage, stage.image.derive(), created_by, layer)

    # -- the end -------------------------------------------------------------------------

    async def finish(self, image: Image) -> None:
        if image.info is None:
            raise BuildError("No image was generated. Is your Dockerfile empty?")
        unused = sorted(set(self.options.build_args) - self.consumed - PROXY_ARGS)
        if unused:
            await self.say(f"[Warning] One or more build-args [{' '.join(unused)}] were not "
                           "consumed\n")
        info = await publish(self.backend, image, [str(t) for t in self.options.tags])
        await self.send({"aux": {"ID": info.id}})
        if self.options.quiet:
            await self.send({"stream": f"{info.id}\n"})
            return
        await self.say(f"Successfully built {_short(info.id)}\n")
        for tag in self.options.tags:
            await self.say(f"Successfully tagged {familiar(str(tag))}\n")


_HANDLERS: dict[str, Callable[[Builder, Stage, Instruction], Awaitable[None]]] = {
    "RUN": Builder._run, "CMD": Builder._cmd, "ENTRYPOINT": Builder._entrypoint,
    "COPY": Builder._copy, "ADD": Builder._copy, "ENV": Builder._env_step,
    "ARG": Builder._arg, "WORKDIR": Builder._workdir, "USER": Builder._user,
    "EXPOSE": Builder._expose, "LABEL": Builder._label, "VOLUME": Builder._volume,
    "SHELL": Builder._shell, "STOPSIGNAL": Builder._stopsignal,
    "MAINTAINER": Builder._maintainer, "ONBUILD": Builder._onbuild,
    "HEALTHCHECK": Builder._healthcheck,
}


async def publish(backend: Backend, image: Image, names: list[str]) -> Any:
    """The built image under `names` in the Docker namespace (none: its build name)."""
    info = image.info
    assert info is not None
    client = backend.clients.images
    blobs: dict[str, tuple[int, Data]] = {
        d: ((await client.content_info(ContentInfoRequest(digest=d))).size, None)
        for d in (info.manifest_digest, info.id)}
    blobs.update({x.digest: (x.size, None) for x in info.layers})
    async with _NAMES:  # with tag/rmi's name changes, one at a time
        return await import_image(client, blobs, info.manifest_digest,
                                  names or [f"{BUILD_REPO}@{info.manifest_digest}"])


async def _sweep(backend: Backend, cri: Cri, clients: Clients) -> None:
    """Pods and views of builds a killed gateway left."""
    try:
        await sweep(cri, ACTIVE)
        views = await clients.snapshots.list_snapshots(SnapshotListRequest(kind="view"))
        for snap in views.snapshots:
            owner, _, rest = snap.key.removeprefix(VIEW_PREFIX).partition("-")
            if snap.key.startswith(VIEW_PREFIX) and \
                    stale(owner, rest.rsplit("-", 1)[0], ACTIVE):
                await clients.snapshots.remove(SnapshotKeyRequest(key=snap.key))
    except Exception as exc:  # a sweep is housekeeping: the build goes on
        log.info("sweeping old build leftovers failed", error=str(exc))


def error_message(exc: BaseException) -> dict[str, Any]:
    """The stream's last message for a build that failed (the CLI exits with `code`)."""
    message = exc.message if isinstance(exc, ShoalError) else from_exception(exc)[1]
    code = exc.code if isinstance(exc, BuildError) else 1
    return {"errorDetail": {"code": code, "message": message}, "error": message}


async def build(backend: Backend, options: BuildOptions, body: Any, send: Send) -> None:
    """POST /build: the context in `body`, progress through `send`."""
    build_id = new_id()
    parent = paths.state_dir(backend) / "build"
    await asyncio.to_thread(parent.mkdir, mode=0o700, parents=True, exist_ok=True)
    def old(name: str) -> bool:  # <pid>-<build id>
        owner, _, ident = name.partition("-")
        return stale(owner, ident, ACTIVE)

    await asyncio.to_thread(ctx.clean_stale, parent, old)
    work = ctx.WorkDir(parent / f"{os.getpid()}-{build_id}")
    await asyncio.to_thread(work.make)
    ACTIVE.add(build_id)
    namespace = build_namespace(backend)
    channel = namespaced_channel(backend.config.cri_socket, namespace)
    try:
        archive = work.root / "context.tar"
        await ctx.spool(body, archive)
        await asyncio.to_thread(ctx.extract, archive, work.context)
        await asyncio.to_thread(archive.unlink)
        data = await asyncio.to_thread(ctx.read_dockerfile, work.context, options.dockerfile)
        await asyncio.to_thread(ctx.apply_dockerignore, work.context)
        dockerfile = parse(data)
        cri = Cri(channel)
        builder = Builder(backend, options, send, work, build_id, cri)
        await _sweep(backend, cri, builder.clients)
        image = await builder.run(dockerfile)
        await builder.finish(image)
    finally:
        ACTIVE.discard(build_id)
        await channel.close(None)
        await asyncio.to_thread(work.remove)


async def prune(backend: Backend) -> dict[str, Any]:
    """POST /build/prune: every step image of the build namespace, and the cache rows."""
    if ACTIVE:
        raise Conflict("a build is running: prune the build cache once it has finished")
    clients = Clients(backend.bus, namespace=build_namespace(backend))
    deleted: list[str] = []
    reclaimed = 0
    for info in (await clients.images.list_images(ImageListRequest())).images:
        try:
            await clients.images.remove(ImageRemoveRequest(ref=info.id))
        except ShoalError as exc:
            log.info("pruning a build image failed", image=info.id, error=exc.message)
            continue
        deleted.append(info.id)
        reclaimed += info.size
    await BuildCache(backend.records).clear()
    return {"CachesDeleted": deleted or None, "SpaceReclaimed": reclaimed}
