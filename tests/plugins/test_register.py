"""register_plugin degrades to the fallbacks with one warning (runs without the library)."""

from __future__ import annotations

import warnings

import pytest

from ragtop.runtime import plugin

ort = pytest.importorskip("onnxruntime")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    monkeypatch.setattr(plugin, "_warned", False)
    monkeypatch.setattr(plugin, "_NATIVE_DIR", tmp_path)
    return tmp_path


def test_missing_library_warns_once_and_returns_false(fresh):
    assert plugin.plugin_library_path() is None
    with pytest.warns(RuntimeWarning, match="not built"):
        assert plugin.register_plugin(ort.SessionOptions()) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plugin.register_plugin(ort.SessionOptions()) is False  # no second warning


def test_unloadable_library_warns_and_returns_false(fresh):
    (fresh / plugin.LIBRARY_NAME).write_bytes(b"not a shared library")
    with pytest.warns(RuntimeWarning, match="failed to load"):
        assert plugin.register_plugin(ort.SessionOptions()) is False
