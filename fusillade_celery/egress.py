"""Egress: the proxies and CA bundle of the environment, read once per process.

Upstream calls honour ``HTTP_PROXY`` / ``HTTPS_PROXY`` / ``ALL_PROXY`` / ``NO_PROXY`` and a
private CA bundle, as plain ``requests`` does, but the process's session does not read the
environment per request (``trust_env`` off: that lookup cost as much as a call's own
bookkeeping): ``upstream.get_session`` reads them once into an :class:`Egress`, and each
attempt asks it for the proxies of its base URL (cached per URL).
"""

from __future__ import annotations

import os
import urllib.parse
import urllib.request

import requests
from requests.adapters import HTTPAdapter
from requests.utils import (
    address_in_network,
    is_ipv4_address,
    is_valid_cidr,
    prepend_scheme_if_needed,
)
from urllib3.util import parse_url

from .settings import redact_url

#: The proxies of a request sent direct. Shared, never modified.
NO_PROXIES: dict[str, str] = {}

#: The variables a CA bundle is read from, first set wins: requests' own two, then OpenSSL's.
CA_BUNDLE_VARS = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE")


class Egress:
    """The proxies and CA bundle of the environment, as requests would apply them
    (``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY``, ``NO_PROXY``, lower case winning;
    ``CA_BUNDLE_VARS``), read once: the session ignores the environment (``trust_env`` off),
    since requests would read it again on every request.

    ``proxies`` is empty when no proxy variable is set, so a request's proxies then cost one
    test; otherwise ``proxies_for`` decides once per distinct base URL whether NO_PROXY
    sends it direct."""

    def __init__(self) -> None:
        found = urllib.request.getproxies_environment()  # what requests.utils.getproxies reads
        self.no_proxy: str | None = found.get("no")
        #: Only the keys requests looks up for an http(s) URL (select_proxy).
        self.proxies: dict[str, str] = {k: found[k] for k in ("http", "https", "all") if k in found}
        self.ca_bundle_var = next((v for v in CA_BUNDLE_VARS if os.environ.get(v)), None)
        #: ``Session.verify``: the CA bundle (a file, or a directory as requests allows), or
        #: True for requests' default (certifi).
        self.verify: bool | str = os.environ[self.ca_bundle_var] if self.ca_bundle_var else True
        self.secrets = {s for url in self.proxies.values() for s in _proxy_secrets(url)}
        #: Why a proxy URL cannot be used (requests would fail every request through it);
        #: None when all can.
        self.unusable: str | None = None
        for key, proxy in self.proxies.items():
            why = self._check(proxy)
            if why is not None:
                self.unusable = f"{key}={_shown_proxy(proxy)} ({why})"
                break
        self._by_url: dict[str, dict[str, str]] = {}

    def _check(self, proxy: str) -> str | None:
        """What requests makes of a proxy URL when it sends through it, done once: None if it
        can be used, else why not (credentials hidden)."""
        adapter = HTTPAdapter()
        try:
            url = prepend_scheme_if_needed(proxy, "http")
            if not parse_url(url).host:
                raise requests.exceptions.InvalidProxyURL("no host")
            adapter.proxy_manager_for(url)
        except Exception as exc:  # noqa: BLE001 - any reason is reported, none is raised
            text = redact_url(f"{type(exc).__name__}: {exc}")
            for secret in self.secrets:
                text = text.replace(secret, "***")
            return text
        finally:
            adapter.close()
        return None

    def proxies_for(self, url: str) -> dict[str, str]:
        """The proxies of a request to ``url`` (a base URL: a few distinct ones per process),
        ``NO_PROXIES`` when NO_PROXY covers its host."""
        proxies = self._by_url.get(url)
        if proxies is None:
            proxies = NO_PROXIES if _bypass(url, self.no_proxy) else self.proxies
            if len(self._by_url) >= 1024:
                self._by_url.clear()
            self._by_url[url] = proxies
        return proxies

    def describe(self) -> str | None:
        """One log line of what was found, credentials hidden; None when nothing was."""
        parts = []
        if self.proxies:
            shown = ", ".join(f"{k}={_shown_proxy(v)}" for k, v in self.proxies.items())
            parts.append(f"proxies {shown} (NO_PROXY={self.no_proxy or ''})")
        if self.ca_bundle_var:
            parts.append(f"CA bundle {self.verify} (from {self.ca_bundle_var})")
        return "upstream requests: " + "; ".join(parts) if parts else None


def _bypass(url: str, no_proxy: str | None) -> bool:
    """requests' ``should_bypass_proxies`` on the NO_PROXY read at start (requests reads the
    environment again on every call, and writes ``no_proxy`` into it when given one): ``*``,
    or a list of hosts, domain suffixes (``.corp`` or ``corp``), ``host:port``, IPv4
    addresses and CIDR blocks."""
    parsed = urllib.parse.urlsplit(url)
    host = parsed.hostname  # lower case
    if host is None:
        return True
    if not no_proxy:
        return False
    if no_proxy.strip() == "*":
        return True
    try:
        port = parsed.port
    except ValueError:  # the request fails on it anyway (checked_url)
        port = None
    host_port = f"{host}:{port}" if port else host
    ipv4 = is_ipv4_address(host)
    for entry in no_proxy.replace(" ", "").split(","):
        if not entry:
            continue
        if ipv4 and is_valid_cidr(entry) and address_in_network(host, entry):
            return True
        entry = entry.lstrip(".").lower()
        if entry in (host, host_port) or host.endswith("." + entry):
            return True
        if host_port.endswith("." + entry):
            return True
    return False


def _proxy_userinfo(url: str) -> tuple[str, str]:
    """(what precedes the credentials, the credentials) of a proxy URL, with or without a
    scheme; the credentials are empty when it has none."""
    head, at, _ = url.rpartition("@")
    if not at:
        return "", ""
    scheme, sep, userinfo = head.rpartition("//")
    return scheme + sep, userinfo


def _shown_proxy(url: str) -> str:
    """A proxy URL fit for a log line: its user and password replaced by ``***``."""
    prefix, userinfo = _proxy_userinfo(url)
    return f"{prefix}***@{url.rpartition('@')[2]}" if userinfo else url


def _proxy_secrets(url: str) -> set[str]:
    """The credentials of a proxy URL (``user:pass``, the password, or a lone user that is a
    token), as written and decoded, to keep out of error records."""
    userinfo = _proxy_userinfo(url)[1]
    user, _, password = userinfo.partition(":")
    secrets = {userinfo, password} if password else {user}
    return {form for s in secrets for form in (s, urllib.parse.unquote(s))} - {""}
