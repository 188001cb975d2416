"""etcd cluster tests: a real three-member etcd in network namespaces, root only; skipped
cleanly (with the reason) where etcd, etcd3gw or namespaces are missing."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import etcdlab as lab_mod  # noqa: E402

WHY_NOT = lab_mod.can_run()


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.cluster)
            if WHY_NOT:
                item.add_marker(pytest.mark.skip(reason=WHY_NOT))


@pytest.fixture
def lab(tmp_path):
    the_lab = lab_mod.Lab(str(tmp_path))
    try:
        yield the_lab
    finally:
        the_lab.close()
