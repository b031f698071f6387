"""Namespaces (containerd's): what scopes images, pods, containers and events on a node, and
the puller's `images.namespaces.*` verbs that list, create and remove them.

A namespace is a label-like name (containerd's rule: letters, digits, `_`, `.`, `-`,
starting and ending with a letter or digit, at most 76 characters). Blobs and unpacked
layers are shared by content across namespaces; names of images, pods and containers are
not. `k8s.io` is the CRI's and always exists."""

from __future__ import annotations

import re
from typing import Annotated

from msgspec import Meta

from shoal_common.errors import Invalid
from shoal_common.messages.base import Message

CRI_NAMESPACE = "k8s.io"
MAX_NAMESPACE = 76
NAMESPACE_PATTERN = r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,74}[A-Za-z0-9])?"
_NAMESPACE_RE = re.compile(NAMESPACE_PATTERN)

NamespaceName = Annotated[str, Meta(pattern=rf"\A{NAMESPACE_PATTERN}\Z")]
# Labels as `shoal namespaces create --label k=v` gives them: printable, bounded.
LabelKey = Annotated[str, Meta(pattern=r"\A[^\x00-\x1f\x7f=]{1,256}\Z")]
LabelValue = Annotated[str, Meta(pattern=r"\A[^\x00-\x1f\x7f]{0,1024}\Z")]
MAX_LABELS = 64
Labels = Annotated[dict[LabelKey, LabelValue], Meta(max_length=MAX_LABELS)]


def valid_namespace(name: str) -> bool:
    return _NAMESPACE_RE.fullmatch(name) is not None


def check_namespace(name: str, where: str = "namespace") -> str:
    """`name` if it is a namespace name, else Invalid saying the rule (and quoting a bounded
    copy of what was given: it may come from anyone's metadata)."""
    if valid_namespace(name):
        return name
    shown = repr(name[:80] + ("..." if len(name) > 80 else ""))
    why = (f"is {len(name)} characters long (at most {MAX_NAMESPACE})"
           if len(name) > MAX_NAMESPACE else "is not a valid name")
    raise Invalid(f"{where} {shown} {why}: use letters, digits, '_', '.' and '-', starting "
                  f"and ending with a letter or digit, at most {MAX_NAMESPACE} characters")


class NamespaceInfo(Message):
    name: str
    labels: dict[str, str] = {}
    created: bool = False  # recorded by `create` (else it exists because it holds images)
    images: int = 0  # image names it holds in the puller's store


class NamespaceListRequest(Message):
    pass


class NamespaceListReply(Message):
    namespaces: list[NamespaceInfo]


class NamespaceCreateRequest(Message):
    name: NamespaceName
    labels: Labels = {}


class NamespaceCreateReply(Message):
    namespace: NamespaceInfo
    created: bool  # False: it existed already (with these labels)


class NamespaceRemoveRequest(Message):
    name: NamespaceName


class NamespaceRemoveReply(Message):
    name: str
