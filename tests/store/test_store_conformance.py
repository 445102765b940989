"""Runs the Store conformance suite (conformance.py) over every backend.

The suite is loaded under a unique module name, so another test directory's
``conformance.py`` can never shadow it; the backends come from conftest.py.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_NAME = "isrsync_tests_store_conformance"
if _NAME not in sys.modules:
    _spec = importlib.util.spec_from_file_location(_NAME, Path(__file__).with_name("conformance.py"))
    assert _spec is not None and _spec.loader is not None
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules[_NAME] = _mod
    _spec.loader.exec_module(_mod)
_suite = sys.modules[_NAME]

globals().update({k: v for k, v in vars(_suite).items() if k.startswith("Test") and isinstance(v, type)})
