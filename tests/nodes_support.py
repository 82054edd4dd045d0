"""Shared pieces of the node tests: switching the pack's host adapter."""

import sys
from contextlib import contextmanager


def host_module(pack):
    return sys.modules[f"{pack.__name__}.nodes.host"]


@contextmanager
def bound_host(pack, **modules):
    """Binds the pack's host adapter to the given modules (none: plain torch) and restores plain torch after."""
    host = host_module(pack)
    host.bind(**modules)
    try:
        yield host
    finally:
        host.bind()


@contextmanager
def plain_host(pack, models_dir):
    """Plain-torch host reading models from models_dir."""
    host = host_module(pack)
    with bound_host(pack, folder_paths=host.PlainFolders(models_dir)) as bound:
        yield bound
