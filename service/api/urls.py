"""Images given by URL (``image_url``, ``image1_url``, ``image2_url``), fetched from allow-listed
hosts.

Off by default: only hosts named in ``settings.url_allowlist`` (``FACEGATE_URL_ALLOWLIST``)
are ever contacted; with an empty list every URL is refused (400 ``url_not_allowed``).
The rules, all checked before a byte is sent:

* ``http`` and ``https`` only (never ``file:`` or any other scheme, so never a server path);
* no userinfo (``user:pass@``) in the URL;
* the host must match an allow-list entry exactly (case-insensitive): ``host`` allows that
  host on its scheme's default port (80 / 443), ``host:port`` exactly that port
  (IPv6: ``[::1]:8080``).  Names are compared, not addresses: list only hosts you trust.

Redirects are not followed blindly: each ``Location`` is checked against the same rules
(at most :data:`MAX_REDIRECTS`), so a redirect off the list is refused with
``url_not_allowed``.  Each connect and each read waits at most ``settings.url_timeout_s``
and the whole fetch at most :data:`DEADLINE_FACTOR` times that.  A body declared or
streamed beyond ``max_image_bytes`` is refused with 413 ``image_too_large`` as soon as the
limit is passed, before anything is decoded; what is fetched then goes through the same
decoder and limits as an upload.  A fetch that fails (a non-2xx answer, a timeout, no
connection) is a 400 ``url_fetch_failed`` whose message says why (e.g. the source's status).
The fetch runs on the event loop with httpx's async client (DNS in a worker thread).
"""

from __future__ import annotations

import asyncio
import time

import httpx

from service.config import parse_host  # the one parser of allow-list entries
from service.pipeline.errors import ImageTooLarge

from .errors import ApiError, bad_request

#: Redirects followed (each target re-checked against the allow-list).
MAX_REDIRECTS = 3
#: The whole fetch (redirects included) may take this many times the connect/read timeout.
DEADLINE_FACTOR = 3
#: Bytes read from the source at a time.
CHUNK_BYTES = 64 * 1024
DEFAULT_PORTS = {"http": 80, "https": 443}


def url_field(image_field: str) -> str:
    """The URL field that may stand in for an image field (``image1`` -> ``image1_url``)."""
    return f"{image_field}_url"


def not_allowed(message: str) -> ApiError:
    return bad_request("url_not_allowed", message)


def fetch_failed(message: str) -> ApiError:
    return bad_request("url_fetch_failed", message)


class UrlFetcher:
    """Checks URLs against the allow-list and fetches their bodies, size-bounded.

    One shared ``httpx.AsyncClient`` (built lazily, closed by :meth:`aclose` in the app's
    lifespan); it never follows redirects itself and honours the proxy environment
    (``HTTP(S)_PROXY``, ``NO_PROXY``).
    """

    def __init__(
        self, allowlist: list[str], timeout_s: float = 5.0, user_agent: str = "facegate"
    ) -> None:
        self.allowed = {parse_host(entry) for entry in allowlist}
        self.timeout_s = float(timeout_s)
        self.user_agent = user_agent
        self._client: httpx.AsyncClient | None = None

    @classmethod
    def from_settings(cls, settings, user_agent: str = "facegate") -> UrlFetcher:
        return cls(settings.url_allowlist, settings.url_timeout_s, user_agent)

    @property
    def enabled(self) -> bool:
        return bool(self.allowed)

    def _client_for_fetch(self) -> httpx.AsyncClient:
        if self._client is None or self._client.is_closed:
            self._client = httpx.AsyncClient(
                follow_redirects=False,
                trust_env=True,
                timeout=httpx.Timeout(self.timeout_s),
                # images are compressed already: ask for the body as it is, so that the
                # size limit counts what the source sends
                headers={
                    "User-Agent": self.user_agent,
                    "Accept": "image/*",
                    "Accept-Encoding": "identity",
                },
            )
        return self._client

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    # -- checks ------------------------------------------------------------------------------
    def check(self, name: str, url: object) -> httpx.URL:
        """The parsed URL if it may be fetched; else 400 ``url_not_allowed`` / ``invalid_url``."""
        if not self.enabled:
            raise not_allowed(
                f"{name}: images by URL are disabled on this server (FACEGATE_URL_ALLOWLIST "
                "is empty); send the image itself"
            )
        if not isinstance(url, str) or not url.strip():
            raise bad_request("invalid_url", f"{name}: must be a non-empty URL string")
        try:
            parsed = httpx.URL(url.strip())
        except (httpx.InvalidURL, ValueError, TypeError) as exc:
            raise bad_request("invalid_url", f"{name}: not a valid URL ({exc})") from None
        return self._check_parsed(name, parsed)

    def _check_parsed(self, name: str, url: httpx.URL) -> httpx.URL:
        scheme = url.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise not_allowed(
                f"{name}: only http and https URLs are fetched, not {scheme or 'a relative URL'!r}"
            )
        if url.userinfo:
            raise not_allowed(f"{name}: URLs with credentials (user:password@) are not accepted")
        host = url.host.lower()
        if not host:
            raise bad_request("invalid_url", f"{name}: the URL has no host")
        port = url.port or DEFAULT_PORTS[scheme]
        allowed = (host, port) in self.allowed or (
            port == DEFAULT_PORTS[scheme] and (host, None) in self.allowed
        )
        if not allowed:
            shown = f"[{host}]" if ":" in host else host
            raise not_allowed(f"{name}: host {shown}:{port} is not on this server's URL allow-list")
        return url

    # -- fetching ------------------------------------------------------------------------------
    async def fetch(self, name: str, url: object, max_bytes: int) -> bytes:
        """The body at ``url`` (checked, redirects re-checked), at most ``max_bytes`` bytes."""
        target = self.check(name, url)
        deadline = self.timeout_s * DEADLINE_FACTOR
        try:
            async with asyncio.timeout(deadline):
                return await self._fetch(name, target, max_bytes)
        except TimeoutError:
            raise fetch_failed(
                f"{name}: the source did not answer in time (more than {deadline:g} s in all)"
            ) from None
        except httpx.TimeoutException as exc:
            raise fetch_failed(
                f"{name}: the source timed out after {self.timeout_s:g} s ({type(exc).__name__})"
            ) from None
        except httpx.HTTPError as exc:
            raise fetch_failed(
                f"{name}: could not fetch the URL: {type(exc).__name__}: {exc}"
            ) from None

    async def _fetch(self, name: str, url: httpx.URL, max_bytes: int) -> bytes:
        client = self._client_for_fetch()
        for _ in range(MAX_REDIRECTS + 1):
            request = client.build_request("GET", url)
            response = await client.send(request, stream=True)
            try:
                if response.is_redirect:
                    location = response.headers.get("location", "")
                    try:
                        url = self._check_parsed(f"{name} (redirect)", url.join(location))
                    except httpx.InvalidURL as exc:
                        raise fetch_failed(
                            f"{name}: the source redirected to an invalid URL ({exc})"
                        ) from None
                    continue
                if not response.is_success:
                    raise fetch_failed(
                        f"{name}: the source answered {response.status_code} "
                        f"{response.reason_phrase}".rstrip()
                    )
                return await _read_bounded(name, response, max_bytes)
            finally:
                await response.aclose()
        raise fetch_failed(f"{name}: more than {MAX_REDIRECTS} redirects")


async def _read_bounded(name: str, response: httpx.Response, max_bytes: int) -> bytes:
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ImageTooLarge(
            f"{name}: the source's body ({int(declared)} bytes) is larger than "
            f"the limit of {max_bytes} bytes"
        )
    chunks, total = [], 0
    async for chunk in response.aiter_bytes(CHUNK_BYTES):  # decoded (gzip etc.) bytes count
        total += len(chunk)
        if total > max_bytes:
            raise ImageTooLarge(
                f"{name}: the source's body is larger than the limit of {max_bytes} bytes"
            )
        chunks.append(chunk)
    return b"".join(chunks)


async def fetch_all(
    fetcher: UrlFetcher, urls: dict[str, tuple[str, object]], max_bytes: int, timings=None
) -> dict[str, bytes]:
    """Fetch ``{image_field: (url_field, url)}`` concurrently -> ``{image_field: bytes}``.

    Every URL is checked before any is fetched; the first failure is raised at once and
    the other fetches are cancelled.
    """
    for field_name, url in urls.values():
        fetcher.check(field_name, url)
    start = time.perf_counter()
    tasks = [
        asyncio.ensure_future(fetcher.fetch(field_name, url, max_bytes))
        for field_name, url in urls.values()
    ]
    try:
        results = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    finally:
        if timings is not None:
            timings.add("fetch", time.perf_counter() - start)
    return dict(zip(urls, results, strict=True))
