"""`docker build` with the classic builder (POST /build, DOCKER_BUILDKIT=0).

How a build runs (builder.py drives it, one step per Dockerfile instruction):

- The context (context.py) is spooled and unpacked into the build's own directory under
  `<state>/docker-gateway/build/<id>/`, every entry checked (no `..`, nothing through a
  symlink), then .dockerignore applied (ignore.py). The Dockerfile is parsed whole first
  (dockerfile.py, words.py for quotes and `$VAR` substitution), so a syntax error is an
  HTTP 400 before any step runs.
- An image being built is a config document plus a chain of layers (commit.py `Image`).
  Every step's result is committed to the puller as an image of its own, named
  `localhost/shoal-build@<manifest digest>` in the Shoal namespace `<docker ns>-build`
  (moby-build): invisible to `docker images`, which lists `moby`, yet a real image the
  CRI can run and the build cache can name by id. Metadata steps (ENV, LABEL, CMD, ...)
  only change the config (a history entry with `empty_layer`); COPY/ADD/RUN/WORKDIR add a
  layer, a gzip'd tar written to the build directory and sent with `images.import.*`.
- COPY and ADD (layers.py) build their layer straight from the context (or, with --from,
  from a read-only view of another stage's or image's layers, which the snapshotter
  mounts): no container runs. The destination is resolved in a view of the image's own
  tree, so symlinks there are followed inside the image, never on the host.
- RUN (run.py) runs the step as a CRI pod + container in the build namespace, on the
  step's parent image (so the executor applies its Env, User and WorkingDir), with the
  build args in its environment; its output is streamed from the CRI log. Once it exits
  (non-zero: "The command '...' returned a non-zero code: N", that code in the error), its
  writable snapshot's changes become the layer (diff.py: the overlay upper dir with
  whiteouts and opaque dirs made OCI `.wh.` entries, or, with the native driver, a
  comparison with the parent's tree), then the pod is removed.
- The cache (store/build_cache.py) maps sha256(parent image id, the step's history text,
  its inputs: for COPY/ADD a digest of the files' paths, modes and contents) to the image
  the step made; a hit whose image is gone from the store is a miss. `nocache` skips it.
- The final image is committed again in the Docker namespace under the `t` names (no
  name: under its build name, which `docker images` shows with tag <none>); its config
  carries Env, Cmd, Entrypoint, WorkingDir, User, ExposedPorts, Labels, Volumes and one
  history entry per instruction, so `docker history` and `docker inspect` show them.
- `docker builder prune` (POST /build/prune) removes the build namespace's images and the
  cache rows.
"""
