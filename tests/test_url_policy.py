"""Hostile URLs are refused with a 400 before anything connects."""

from __future__ import annotations

import ipaddress

import pytest
from flask.testing import FlaskClient

from api.app import create_app
from common.settings import Settings
from common.url_policy import BlockedUrl, IPAddress, UrlPolicy, is_public

HOSTILE = [
    "http://127.0.0.1/v.mp4",
    "http://localhost/v.mp4",
    "http://10.0.0.8/v.mp4",
    "http://172.16.3.4/v.mp4",
    "http://192.168.1.1/v.mp4",
    "http://169.254.169.254/latest/meta-data/",
    "http://[fd00:ec2::254]/latest/meta-data/",
    "http://100.64.0.1/v.mp4",  # carrier-grade NAT
    "http://[::ffff:127.0.0.1]/v.mp4",  # IPv4-mapped IPv6
    "http://[::ffff:a9fe:a9fe]/v.mp4",  # mapped metadata address, hex form
    "http://2130706433/v.mp4",  # decimal 127.0.0.1
    "http://0x7f000001/v.mp4",  # hex 127.0.0.1
    "http://0177.0.0.1/v.mp4",  # octal 127.0.0.1
    "http://127.1/v.mp4",  # short form
    "http://0.0.0.0/v.mp4",
    "http://[::1]/v.mp4",
    "http://[2002:7f00:1::]/v.mp4",  # 6to4 wrapping 127.0.0.1
    "http://[64:ff9b::a9fe:a9fe]/v.mp4",  # NAT64 wrapping the metadata address
    "http://224.0.0.1/v.mp4",
]


@pytest.mark.parametrize("url", HOSTILE)
def test_internal_targets_are_blocked(url: str) -> None:
    with pytest.raises(BlockedUrl, match="non-public address"):
        UrlPolicy().check(url)


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "gopher://x/", "ftp://h/v.mp4", "dict://h:11211/", "http:///v.mp4"]
)
def test_other_schemes_and_hostless_urls_are_blocked(url: str) -> None:
    with pytest.raises(BlockedUrl):
        UrlPolicy().check(url)


def test_public_literal_addresses_pass_and_the_checked_address_is_kept() -> None:
    target = UrlPolicy().check("https://93.184.215.14:8443/a.mp4?x=1")
    assert (target.host, target.port, str(target.address)) == ("93.184.215.14", 8443, "93.184.215.14")


def _resolver(answers: dict[str, list[str]]):
    # No DNS server of ours can be reached here: a resolver stands in for one, as a table.
    def resolve(host: str, port: int) -> list[IPAddress]:
        return [ipaddress.ip_address(a) for a in answers[host]]

    return resolve


def test_a_name_with_one_public_and_one_private_address_is_blocked() -> None:
    policy = UrlPolicy.from_allowlist([], resolver=_resolver({"mixed.example": ["93.184.215.14", "10.1.2.3"]}))
    with pytest.raises(BlockedUrl, match=r"10\.1\.2\.3"):
        policy.check("https://mixed.example/v.mp4")


def test_the_allowlist_admits_named_private_hosts_and_networks_only() -> None:
    resolver = _resolver({"minio.internal": ["10.0.0.5"], "other.internal": ["10.0.0.6"]})
    policy = UrlPolicy.from_allowlist(["minio.internal", "192.168.7.0/24"], resolver=resolver)
    assert str(policy.check("http://minio.internal:9000/b/k").address) == "10.0.0.5"
    assert str(policy.check("http://192.168.7.20/v.mp4").address) == "192.168.7.20"
    with pytest.raises(BlockedUrl):
        policy.check("http://other.internal/v.mp4")
    with pytest.raises(BlockedUrl):
        policy.check("http://192.168.8.1/v.mp4")


def test_is_public_on_plain_addresses() -> None:
    assert is_public(ipaddress.ip_address("8.8.8.8"))
    assert is_public(ipaddress.ip_address("2606:4700::1111"))
    assert not is_public(ipaddress.ip_address("fe80::1"))


@pytest.fixture()
def client(local_settings: Settings) -> FlaskClient:
    return create_app(local_settings).test_client()


@pytest.mark.parametrize("url", [*HOSTILE[:12], "file:///etc/passwd"])
def test_the_api_answers_400_naming_the_url_field(client: FlaskClient, url: str) -> None:
    response = client.post(
        "/v1/jobs", json={"question": "q", "videos": [{"url": "https://93.184.215.14/ok.mp4"}, {"url": url}]}
    )
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["details"][0]["field"] == "videos.1.url"
