"""Who may connect: the pre-auth budget per client address and in all, and the drain."""

from __future__ import annotations

import ipaddress

from server.admission import Admission, client_address

PROXY = [ipaddress.ip_network("10.0.0.0/8")]


def test_one_address_at_its_allowance_leaves_room_for_others() -> None:
    admission = Admission(max_total=100, max_per_address=2)
    assert admission.admit("198.51.100.7") and admission.admit("198.51.100.7")
    assert not admission.admit("198.51.100.7")
    assert admission.refusal("198.51.100.7") == (
        429, "too many connections waiting to authenticate from your address (2)",
    )  # fmt: skip
    assert admission.refusal("198.51.100.8") is None
    assert admission.admit("198.51.100.8")
    assert admission.preauth == 3


def test_the_total_budget_stays_a_backstop() -> None:
    admission = Admission(max_total=2, max_per_address=5)
    assert admission.admit("a") and admission.admit("b")
    assert admission.refusal("c") == (503, "too many connections waiting to authenticate (2)")
    assert not admission.admit("c")


def test_an_authenticated_connection_frees_its_place() -> None:
    admission = Admission(max_total=10, max_per_address=1)
    assert admission.admit("a")
    admission.authenticated("a")
    assert admission.preauth == 0
    assert admission.admit("a")


def test_a_draining_process_refuses_everyone() -> None:
    admission = Admission(max_total=10, max_per_address=10)
    admission.begin_drain()
    assert admission.draining
    assert admission.refusal("a") == (503, "shutting down")


def test_the_peer_is_the_client_without_a_trusted_proxy() -> None:
    assert client_address(("192.0.2.1", 5000), "203.0.113.9", []) == "192.0.2.1"
    assert client_address(("10.1.2.3", 5000), "203.0.113.9", []) == "10.1.2.3"


def test_a_trusted_proxy_names_the_client_in_x_forwarded_for() -> None:
    forwarded = "203.0.113.9, 10.0.0.5"  # the client, then an inner proxy
    assert client_address(("10.1.2.3", 5000), forwarded, PROXY) == "203.0.113.9"
    # an untrusted peer cannot choose its address with the header
    assert client_address(("192.0.2.1", 5000), forwarded, PROXY) == "192.0.2.1"


def test_ipv6_addresses_count_by_their_64_and_mapped_ipv4_as_ipv4() -> None:
    one = client_address(("2001:db8:1:2::1", 5000, 0, 0), None, [])
    other = client_address(("2001:db8:1:2:ffff::9", 5000, 0, 0), None, [])
    assert one == other == "2001:db8:1:2::/64"
    assert client_address(("::ffff:192.0.2.1", 5000, 0, 0), None, []) == "192.0.2.1"
    assert client_address(None, None, []) == ""
