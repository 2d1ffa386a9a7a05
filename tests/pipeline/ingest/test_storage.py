"""pipeline/ingest/storage.py: keys cannot escape their root; credentials are redacted."""

from __future__ import annotations

import pytest

from pipeline.ingest.storage import UnsafeKeyError, open_store, redact, safe_key


@pytest.mark.parametrize("key", ["../x", "a/../../b", "/etc/passwd", "", "a/\x00b", ".."])
def test_unsafe_keys_are_refused(key: str, tmp_path) -> None:
    with pytest.raises(UnsafeKeyError):
        open_store(str(tmp_path)).write_text(key, "x")


def test_odd_but_safe_keys(tmp_path) -> None:
    st = open_store(str(tmp_path / "root"), create=True)
    for k in ["with space/ü ñ 图片.jpg", "./a//b.txt"]:
        st.write_text(k, "ok")
        assert st.read_text(k) == "ok"
    assert safe_key("./a//b.txt") == "a/b.txt"
    assert sorted(st.list()) == ["a/b.txt", "with space/ü ñ 图片.jpg"]
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "root").rglob("*"))


def test_redact(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    assert redact("failed with s3cr3t-value in it") == "failed with *** in it"
    assert redact("s3://user:pass@host/b") == "s3://***@host/b"
