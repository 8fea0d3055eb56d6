"""Tenant prefixes (pipeline/storage/scope.py): every trick a hostile tenant might try to reach outside them."""

from __future__ import annotations

import pytest

from stylequeue.errors import InputForbidden
from stylequeue.pipeline.storage.scope import confine, normalise, url_host, within

PREFIXES = [normalise(p, prefix=True) for p in (
    "s3://uploads/miniapp/", "https://cdn.example.com/photos", "file:///srv/in/miniapp/")]


@pytest.mark.parametrize(("uri", "normal"), [
    ("s3://uploads/miniapp/a.jpg", "s3://uploads/miniapp/a.jpg"),
    ("S3://uploads/miniapp/a.jpg", "s3://uploads/miniapp/a.jpg"),  # schemes are case-insensitive
    ("s3://uploads/miniapp/2026/照片.jpg", "s3://uploads/miniapp/2026/照片.jpg"),  # CJK names are fine
    ("s3://uploads/miniapp/a..b.jpg", "s3://uploads/miniapp/a..b.jpg"),  # dots inside a name are a name
    ("s3://uploads/miniapp/a b?.jpg", "s3://uploads/miniapp/a b?.jpg"),  # S3 keys are literal
    ("https://cdn.example.com/photos/a.jpg?X-Amz-Signature=ab%3D", "https://cdn.example.com/photos/a.jpg?X-Amz-Signature=ab%3D"),
    ("HTTPS://CDN.Example.COM:443/photos/a.jpg", "https://cdn.example.com/photos/a.jpg"),
    ("https://cdn.example.com./photos/a.jpg#top", "https://cdn.example.com/photos/a.jpg"),
    ("file:///srv/in/miniapp/a.jpg", "file:///srv/in/miniapp/a.jpg"),
])
def test_uris_inside_the_prefixes_are_accepted_in_one_normal_form(uri: str, normal: str) -> None:
    assert confine(uri, PREFIXES, "input_uri") == normal


@pytest.mark.parametrize("uri", [
    # a neighbour that shares a prefix of the name
    "s3://uploads/miniappX/a.jpg", "s3://uploads/miniapp", "s3://uploadsX/miniapp/a.jpg",
    "https://cdn.example.com/photosX/a.jpg", "https://cdn.example.com/photos", "file:///srv/in/miniappX/a.jpg",
    "https://cdn.example.com.evil.com/photos/a.jpg",
    # case: buckets are lower-case, keys and paths are compared exactly
    "s3://Uploads/miniapp/a.jpg", "s3://uploads/MiniApp/a.jpg", "file:///srv/in/MINIAPP/a.jpg",
    # dot segments, plain and disguised
    "s3://uploads/miniapp/../other/a.jpg", "s3://uploads/miniapp/./a.jpg", "s3://uploads/miniapp/..",
    "s3://uploads/miniapp/..;/other/a.jpg", "https://cdn.example.com/photos/../admin/a.jpg",
    "https://cdn.example.com/photos/..;x=1/admin", "file:///srv/in/miniapp/../other/a.jpg",
    "s3://uploads/miniapp/%2e%2e/other/a.jpg", "s3://uploads/miniapp/%2E%2E/other/a.jpg",
    "https://cdn.example.com/photos/%2e%2e/admin", "https://cdn.example.com/photos/.%2e/admin",
    "https://cdn.example.com/photos/..%2fadmin", "https://cdn.example.com/photos/%252e%252e/admin",
    "https://cdn.example.com/photos/..%5cadmin", "https://cdn.example.com/photos/a%00.jpg",
    # empty segments and backslashes
    "s3://uploads/miniapp//a.jpg", "s3://uploads//miniapp/a.jpg", "https://cdn.example.com/photos//a.jpg",
    "file:///srv/in/miniapp//a.jpg", "s3://uploads/miniapp\\..\\other\\a.jpg",
    "https://cdn.example.com\\@evil.com/photos/a.jpg", "https://cdn.example.com/photos\\..\\admin",
    # unicode look-alikes, invisible characters and unnormalised text
    "s3://uploads/miniapp\uff0f..\uff0fother/a.jpg", "s3://uploads/miniapp/\uff0e\uff0e/other/a.jpg",
    "s3://uploads/miniapp/\u2025/other/a.jpg", "s3://uploads/miniapp\u2215..\u2215other/a.jpg",
    "s3://uploads/miniapp/\u2044../a.jpg", "s3://uploads/miniapp/\u200b../a.jpg",
    "s3://uploads/miniapp/\u202egpj.exe", "s3://uploads/miniapp/e\u0301.jpg",
    "https://cdn.ex\u0430mple.com/photos/a.jpg", "https://cdn.example.com\u3002evil.com/photos/a.jpg",
    "https://\uff43dn.example.com/photos/a.jpg", "s3://uploads/miniapp/\ufe68a.jpg",
    # control characters
    "s3://uploads/miniapp/a.jpg\x00.png", "s3://uploads/miniapp/a\n.jpg", "s3://uploads/miniapp/a\x7f.jpg",
    # user info and other authority tricks
    "https://cdn.example.com@evil.com/photos/a.jpg", "https://evil.com#@cdn.example.com/photos/a.jpg",
    "https://evil.com?@cdn.example.com/photos/a.jpg", "https://user:pw@cdn.example.com/photos/a.jpg",
    "https://cdn.example.com:8443/photos/a.jpg", "http://cdn.example.com/photos/a.jpg",
    "https://cdn.example.com:99999/photos/a.jpg", "https://cdn.example.com:+443/photos/a.jpg",
    # file:// forms that mean something else somewhere else
    "file://localhost/srv/in/miniapp/a.jpg", "file://./srv/in/miniapp/a.jpg", "file://~/miniapp/a.jpg",
    "file:/srv/in/miniapp/a.jpg",
    # other schemes and no scheme
    "ftp://uploads/miniapp/a.jpg", "uploads/miniapp/a.jpg", "s3:/uploads/miniapp/a.jpg", "",
])
def test_every_trick_is_refused(uri: str) -> None:
    with pytest.raises(InputForbidden):
        confine(uri, PREFIXES, "input_uri")


def test_a_refusal_says_why_without_echoing_a_query() -> None:
    with pytest.raises(InputForbidden, match="outside the prefixes") as refused:
        confine("https://cdn.example.com/private/a.jpg?X-Amz-Signature=secret", PREFIXES, "input_uri")
    assert "secret" not in str(refused.value)
    with pytest.raises(InputForbidden, match=r"'\.' or '\.\.' segment"):
        normalise("s3://uploads/miniapp/../x")


def test_prefixes_always_end_with_a_slash() -> None:
    assert normalise("s3://uploads", prefix=True) == "s3://uploads/"
    assert normalise("s3://uploads/miniapp", prefix=True) == "s3://uploads/miniapp/"
    assert normalise("HTTPS://CDN.example.com", prefix=True) == "https://cdn.example.com/"
    assert normalise("file:///srv/in", prefix=True) == "file:///srv/in/"
    assert within(normalise("s3://uploads/any.jpg"), [normalise("s3://uploads", prefix=True)])
    with pytest.raises(InputForbidden):
        normalise("https://cdn.example.com/photos/?x=1", prefix=True)


def test_callback_hosts_are_read_the_way_a_client_would_connect() -> None:
    assert url_host("https://API.example.com:8443/hook?token=x") == "api.example.com"
    assert url_host("https://api.example.com./hook") == "api.example.com"
    for tricky in ("https://api.example.com@evil.com/hook", "https://api.example.com\\@evil.com/",
                   "ftp://api.example.com/", "https://api.ex\u0430mple.com/"):
        with pytest.raises(InputForbidden):
            url_host(tricky)
