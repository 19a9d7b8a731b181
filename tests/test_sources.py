"""Model id resolution: local files and directories, the hub cache, and the errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import constants

from mrs.errors import LoadError
from mrs.loading.sources import resolve_gguf, resolve_model


def test_local_dir_and_file(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert resolve_model(str(tmp_path)) == tmp_path.resolve()
    assert resolve_gguf(str(tmp_path / "m.gguf")) == (tmp_path / "m.gguf").resolve()
    assert resolve_gguf(str(tmp_path)) == (tmp_path / "m.gguf").resolve()  # the only .gguf
    assert resolve_gguf(str(tmp_path), "m.gguf") == (tmp_path / "m.gguf").resolve()


def test_several_gguf_files_need_a_filename(tmp_path: Path) -> None:
    for name in ("a.Q4_0.gguf", "a.Q8_0.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(LoadError, match=r"several \.gguf files \(a\.Q4_0\.gguf, a\.Q8_0\.gguf\); set quantized_filename"):
        resolve_gguf(str(tmp_path))
    assert resolve_gguf(str(tmp_path), "a.Q8_0.gguf").name == "a.Q8_0.gguf"
    with pytest.raises(LoadError, match=r"'b\.gguf' not found in"):
        resolve_gguf(str(tmp_path), "b.gguf")


def test_empty_dir_has_no_gguf(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match=r"no \.gguf file in .*set quantized_filename"):
        resolve_gguf(str(tmp_path))


def test_file_id_with_a_different_filename(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(LoadError, match="is a file, but quantized_filename is 'other.gguf'"):
        resolve_gguf(str(tmp_path / "m.gguf"), "other.gguf")


def test_unknown_repo_offline_names_every_place(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoadError) as err:
        resolve_model("mrs-tests/no-such-model")
    message = err.value.message
    assert message.startswith("model 'mrs-tests/no-such-model' not found; looked in: local path ")
    assert "hub cache" in message and "hub download skipped (HF_HUB_OFFLINE is set)" in message


def test_unknown_repo_online_tries_the_download(monkeypatch) -> None:
    # No network here (and none needed in CI): the download attempt fails and is listed.
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "2")
    with pytest.raises(LoadError) as err:
        resolve_model("mrs-tests/no-such-model")
    assert "hub cache" in err.value.message and "hub download https://" in err.value.message


def test_hub_cache_is_used_offline(tmp_path: Path, monkeypatch) -> None:
    """A snapshot laid out as huggingface_hub caches it resolves without any network."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--mrs-tests--cached-model"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    (snapshot / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_gguf("mrs-tests/cached-model") == snapshot / "model.gguf"
