"""The puller's OCI distribution registry client: references, auth, platforms, HTTP.

The media type constants are shoal_common.oci's, named here for the client's callers."""

from shoal_common.oci import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    INDEX_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
)

from shoal_puller.registry.auth import Credentials
from shoal_puller.registry.client import ALL_MANIFEST_TYPES, Manifest, RegistryClient
from shoal_puller.registry.platform import Platform, select_manifest
from shoal_puller.registry.reference import Reference, parse_reference

__all__ = [
    "ALL_MANIFEST_TYPES",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "INDEX_TYPES",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "Credentials",
    "Manifest",
    "Platform",
    "Reference",
    "RegistryClient",
    "parse_reference",
    "select_manifest",
]
