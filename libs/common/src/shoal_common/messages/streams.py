"""Supervisor commands behind the CRI streaming server (`shoal.v1.<node>.monitor.<verb>`):
interactive exec sessions, attach and terminal resize.

An exec session runs under its own conmon (`--exec --exec-attach`) in three steps, so the
gateway is connected before the process writes a byte: `exec_create` (conmon is ready and
waits; the reply names its attach socket), the gateway connects, `exec_start` (the process
runs), and after the output ends `exec_wait` (its exit code). `exec_remove` stops and
forgets a session the gateway gives up on. Every step keeps its state in files, so any
supervisor replica may answer any of them."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from shoal_common.messages.base import Message
from shoal_common.messages.fields import AbsPath, ExecId, ObjectId, OptionalAbsPath

# An image-style user ("name", "uid", "uid:gid", "name:group"), resolved against the
# container's own /etc/passwd and /etc/group by the supervisor; "" = the container's user.
ExecUser = Annotated[str, Meta(pattern=r"\A(|[A-Za-z0-9_.][A-Za-z0-9_.@$-]{0,63}"
                               r"(:[A-Za-z0-9_.][A-Za-z0-9_.@$-]{0,63})?)\Z")]


class ExecCreateRequest(Message):
    id: ObjectId  # the container
    exec_id: ExecId  # caller-chosen session id; a retry is answered
    cmd: list[str]
    env: list[str] = []
    tty: bool = False
    stdin: bool = False
    user: ExecUser = ""
    cwd: OptionalAbsPath = ""  # "" = the container's working directory
    # Initial terminal size when the client already sent one (0 = unknown).
    height: int = 0
    width: int = 0


class ExecSession(Message):
    exec_id: ExecId
    # conmon's attach socket (unix SOCK_SEQPACKET): input packets are raw stdin bytes,
    # output packets start with a byte naming the stream (2 stdout, 3 stderr).
    attach_socket: AbsPath


class ExecIdRequest(Message):
    """For exec_start, exec_wait and exec_remove."""

    id: ObjectId
    exec_id: ExecId


class ExecStarted(Message):
    pid: int


class ExecExit(Message):
    exit_code: int


class AttachInfo(Message):
    """Where to attach to a running container's own conmon (request: TaskIdRequest)."""

    attach_socket: AbsPath
    tty: bool = False
    stdin: bool = False  # the container was created with stdin open
    stdin_once: bool = False


class ResizeRequest(Message):
    """Resize the terminal of a container (exec_id "") or of one of its exec sessions."""

    id: ObjectId
    height: Annotated[int, Meta(ge=0, le=65535)]
    width: Annotated[int, Meta(ge=0, le=65535)]
    exec_id: Annotated[str, Meta(pattern=r"\A[A-Za-z0-9_-]{0,64}\Z")] = ""
