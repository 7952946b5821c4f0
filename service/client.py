"""A small typed Python client of the facegate REST API, on httpx: :class:`Client` (sync) and
:class:`AsyncClient` (async) with the same methods.

    from service.client import Client, NotFound

    with Client("http://127.0.0.1:8000", api_key="...") as fg:
        fg.create_subject("staff", "ada", {"team": "x"})
        fg.enrol("staff", "ada", "ada.jpg")
        fg.identify("staff", "probe.jpg").faces[0].match

Images are ``bytes`` or a path.  Every error answer of the server is raised as a
:class:`FacegateError` subclass chosen by its status (:class:`NotFound`, :class:`Conflict`,
...) that carries the server's error ``code``, ``message`` and ``status``; network
failures are httpx's own exceptions.  Galleries, subjects, their faces and audit records
come back as the frozen records of :mod:`service.records` (``GalleryRecord``,
``SubjectRecord``, ``FaceRecord``, ``AuditRecord`` and the pages ``SubjectPage``,
``AuditPage``); the other answers as the frozen answers of :mod:`service.answers`
(``VerifyAnswer``, ``IdentifyAnswer``, ``DetectAnswer``, ``EmbedAnswer`` with float32
embeddings, ``EnrolAnswer``, ``BulkAnswer``, ``ReenrolReport``, ``Deleted``,
``InfoAnswer``).  Both also read as the server's JSON objects (see docs/api.md and
``/docs``).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from service.answers import (
    BulkAnswer,
    Deleted,
    DetectAnswer,
    EmbedAnswer,
    EnrolAnswer,
    IdentifyAnswer,
    InfoAnswer,
    ReenrolReport,
    VerifyAnswer,
)
from service.records import (
    AuditPage,
    GalleryRecord,
    SubjectPage,
    SubjectRecord,
)

Image = bytes | str | Path
JSON = dict[str, Any]


# --- errors ---------------------------------------------------------------------------------
class FacegateError(Exception):
    """An error answer of the server: ``status``, ``code`` (e.g. ``no_face``), ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class InvalidRequest(FacegateError):
    """400, 413, 415 or 422: a bad image, field or option (nothing was changed)."""


class Unauthorized(FacegateError):
    """401: no API key."""


class Forbidden(FacegateError):
    """403: a wrong key, or one without the scope or gallery."""


class NotFound(FacegateError):
    """404: unknown gallery, subject or face."""


class Conflict(FacegateError):
    """409: another model's gallery (``model_mismatch``) or a conflicting write."""


class NotReady(FacegateError):
    """503: the service is starting or shutting down."""


_BY_STATUS = {401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 503: NotReady}


def error_for(response: httpx.Response) -> FacegateError:
    """The typed error of an error answer."""
    try:
        detail = response.json()["error"]
        code, message = str(detail["code"]), str(detail["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", response.text[:500]
    cls = _BY_STATUS.get(response.status_code)
    if cls is None:
        cls = InvalidRequest if 400 <= response.status_code < 500 else FacegateError
    return cls(response.status_code, code, message)


# --- requests, built once for both clients --------------------------------------------------
def _bytes(image: Image) -> bytes:
    return image if isinstance(image, bytes) else Path(image).read_bytes()


def _b64(image: Image) -> str:
    return base64.b64encode(_bytes(image)).decode()


def _fields(**options: Any) -> dict[str, str]:
    return {
        key: value if isinstance(value, str) else json.dumps(value)
        for key, value in options.items()
        if value is not None
    }


@dataclass
class _Call:
    method: str
    path: str
    kwargs: dict = field(default_factory=dict)
    raw: bool = False  # answer the body's bytes, not JSON
    typed: Callable[[Any], Any] | None = None  # the answer's JSON -> its typed record


def _galleries(data: Any) -> list[GalleryRecord]:
    return [GalleryRecord.from_json(g) for g in data["galleries"]]


class _Endpoints:
    """Every endpoint as a :class:`_Call`; the clients send them."""

    @staticmethod
    def verify(
        image1: Image | None = None,
        image2: Image | None = None,
        *,
        gallery: str | None = None,
        subject_id: str | None = None,
        embedding: str | None = None,
        model: str | None = None,
        operating_point: str | None = None,
    ) -> _Call:
        files = {
            name: (name, _bytes(image))
            for name, image in (("image1", image1), ("image2", image2))
            if image is not None
        }
        data = _fields(
            gallery=gallery,
            subject_id=subject_id,
            embedding=embedding,
            model=model,
            operating_point=operating_point,
        )
        if not files:
            return _Call("POST", "/v1/verify", {"json": data}, typed=VerifyAnswer.from_json)
        return _Call(
            "POST", "/v1/verify", {"data": data, "files": files}, typed=VerifyAnswer.from_json
        )

    @staticmethod
    def identify(
        gallery: str,
        image: Image | None = None,
        *,
        top_k: int | None = None,
        threshold: float | None = None,
        operating_point: str | None = None,
        embedding: str | None = None,
        model: str | None = None,
    ) -> _Call:
        options = {
            "gallery": gallery,
            "top_k": top_k,
            "threshold": threshold,
            "operating_point": operating_point,
            "embedding": embedding,
            "model": model,
        }
        body = {k: v for k, v in options.items() if v is not None}
        if image is not None:
            body["image"] = _b64(image)
        return _Call("POST", "/v1/identify", {"json": body}, typed=IdentifyAnswer.from_json)

    @staticmethod
    def detect(image: Image, **options: Any) -> _Call:
        return _Call(
            "POST",
            "/v1/detect",
            {"json": {"image": _b64(image), **options}},
            typed=DetectAnswer.from_json,
        )

    @staticmethod
    def embed(image: Image, **options: Any) -> _Call:
        return _Call(
            "POST",
            "/v1/embed",
            {"json": {"image": _b64(image), **options}},
            typed=EmbedAnswer.from_json,
        )

    @staticmethod
    def info() -> _Call:
        return _Call("GET", "/v1/info", typed=InfoAnswer.from_json)

    @staticmethod
    def galleries() -> _Call:
        return _Call("GET", "/v1/galleries", typed=_galleries)

    @staticmethod
    def create_gallery(gallery: str) -> _Call:
        return _Call("PUT", f"/v1/galleries/{gallery}", typed=GalleryRecord.from_json)

    @staticmethod
    def gallery(gallery: str) -> _Call:
        return _Call("GET", f"/v1/galleries/{gallery}", typed=GalleryRecord.from_json)

    @staticmethod
    def delete_gallery(gallery: str) -> _Call:
        return _Call("DELETE", f"/v1/galleries/{gallery}", typed=Deleted.from_json)

    @staticmethod
    def create_subject(gallery: str, subject_id: str, metadata: JSON | None = None) -> _Call:
        return _Call(
            "POST",
            f"/v1/galleries/{gallery}/subjects",
            {"json": {"subject_id": subject_id, "metadata": metadata}},
            typed=SubjectRecord.from_json,
        )

    @staticmethod
    def subjects(gallery: str, limit: int = 100, cursor: str | None = None) -> _Call:
        params = _fields(limit=str(limit), cursor=cursor)
        return _Call(
            "GET",
            f"/v1/galleries/{gallery}/subjects",
            {"params": params},
            typed=SubjectPage.from_json,
        )

    @staticmethod
    def subject(gallery: str, subject_id: str) -> _Call:
        return _Call(
            "GET", f"/v1/galleries/{gallery}/subjects/{subject_id}", typed=SubjectRecord.from_json
        )

    @staticmethod
    def update_subject(gallery: str, subject_id: str, metadata: JSON) -> _Call:
        return _Call(
            "PATCH",
            f"/v1/galleries/{gallery}/subjects/{subject_id}",
            {"json": {"metadata": metadata}},
            typed=SubjectRecord.from_json,
        )

    @staticmethod
    def delete_subject(gallery: str, subject_id: str) -> _Call:
        return _Call(
            "DELETE", f"/v1/galleries/{gallery}/subjects/{subject_id}", typed=Deleted.from_json
        )

    @staticmethod
    def enrol(gallery: str, subject_id: str, image: Image) -> _Call:
        return _Call(
            "POST",
            f"/v1/galleries/{gallery}/subjects/{subject_id}/faces",
            {"files": {"image": ("image", _bytes(image))}},
            typed=EnrolAnswer.from_json,
        )

    @staticmethod
    def enrol_many(
        gallery: str, items: Iterable[tuple[str, Image] | tuple[str, Image, JSON]]
    ) -> _Call:
        body = []
        for item in items:
            entry: JSON = {"subject_id": item[0], "image": _b64(item[1])}
            if len(item) > 2:
                entry["metadata"] = item[2]
            body.append(entry)
        return _Call(
            "POST",
            f"/v1/galleries/{gallery}/faces",
            {"json": {"items": body}},
            typed=BulkAnswer.from_json,
        )

    @staticmethod
    def reenrol(gallery: str, source: str) -> _Call:
        return _Call(
            "POST",
            f"/v1/galleries/{gallery}/reenrol",
            {"json": {"source": source}},
            typed=ReenrolReport.from_json,
        )

    @staticmethod
    def delete_face(gallery: str, face_id: int) -> _Call:
        return _Call(
            "DELETE", f"/v1/galleries/{gallery}/faces/{int(face_id)}", typed=Deleted.from_json
        )

    @staticmethod
    def export(gallery: str) -> _Call:
        return _Call("GET", f"/v1/galleries/{gallery}/export", raw=True)

    @staticmethod
    def audit(**filters: Any) -> _Call:
        return _Call("GET", "/v1/audit", {"params": _fields(**filters)}, typed=AuditPage.from_json)


def _answer(call: _Call, response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise error_for(response)
    if call.raw:
        return response.content
    return response.json() if call.typed is None else call.typed(response.json())


def _headers(api_key: str | None) -> dict[str, str]:
    return {} if api_key is None else {"X-API-Key": api_key}


# --- the clients ----------------------------------------------------------------------------
class Client:
    """The synchronous client; use as a context manager or call :meth:`close`."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        http: httpx.Client | None = None,
    ) -> None:
        self._http = http or httpx.Client(
            base_url=base_url, headers=_headers(api_key), timeout=timeout
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: _Call) -> Any:
        return _answer(call, self._http.request(call.method, call.path, **call.kwargs))

    def verify(
        self,
        image1: Image | None = None,
        image2: Image | None = None,
        *,
        gallery: str | None = None,
        subject_id: str | None = None,
        embedding: str | None = None,
        model: str | None = None,
        operating_point: str | None = None,
    ) -> VerifyAnswer:
        return self._send(
            _Endpoints.verify(
                image1,
                image2,
                gallery=gallery,
                subject_id=subject_id,
                embedding=embedding,
                model=model,
                operating_point=operating_point,
            )
        )

    def identify(
        self,
        gallery: str,
        image: Image | None = None,
        *,
        top_k: int | None = None,
        threshold: float | None = None,
        operating_point: str | None = None,
        embedding: str | None = None,
        model: str | None = None,
    ) -> IdentifyAnswer:
        return self._send(
            _Endpoints.identify(
                gallery,
                image,
                top_k=top_k,
                threshold=threshold,
                operating_point=operating_point,
                embedding=embedding,
                model=model,
            )
        )

    def detect(self, image: Image, **options: Any) -> DetectAnswer:
        return self._send(_Endpoints.detect(image, **options))

    def embed(self, image: Image, **options: Any) -> EmbedAnswer:
        return self._send(_Endpoints.embed(image, **options))

    def info(self) -> InfoAnswer:
        return self._send(_Endpoints.info())

    def galleries(self) -> list[GalleryRecord]:
        return self._send(_Endpoints.galleries())

    def create_gallery(self, gallery: str) -> GalleryRecord:
        return self._send(_Endpoints.create_gallery(gallery))

    def gallery(self, gallery: str) -> GalleryRecord:
        return self._send(_Endpoints.gallery(gallery))

    def delete_gallery(self, gallery: str) -> Deleted:
        return self._send(_Endpoints.delete_gallery(gallery))

    def create_subject(
        self, gallery: str, subject_id: str, metadata: JSON | None = None
    ) -> SubjectRecord:
        return self._send(_Endpoints.create_subject(gallery, subject_id, metadata))

    def subjects(self, gallery: str, limit: int = 100, cursor: str | None = None) -> SubjectPage:
        return self._send(_Endpoints.subjects(gallery, limit, cursor))

    def subject(self, gallery: str, subject_id: str) -> SubjectRecord:
        return self._send(_Endpoints.subject(gallery, subject_id))

    def update_subject(self, gallery: str, subject_id: str, metadata: JSON) -> SubjectRecord:
        return self._send(_Endpoints.update_subject(gallery, subject_id, metadata))

    def delete_subject(self, gallery: str, subject_id: str) -> Deleted:
        return self._send(_Endpoints.delete_subject(gallery, subject_id))

    def enrol(self, gallery: str, subject_id: str, image: Image) -> EnrolAnswer:
        return self._send(_Endpoints.enrol(gallery, subject_id, image))

    def enrol_many(
        self, gallery: str, items: Iterable[tuple[str, Image] | tuple[str, Image, JSON]]
    ) -> BulkAnswer:
        """Bulk enrolment: ``(subject_id, image[, metadata])`` items, answered per item."""
        return self._send(_Endpoints.enrol_many(gallery, items))

    def delete_face(self, gallery: str, face_id: int) -> Deleted:
        return self._send(_Endpoints.delete_face(gallery, face_id))

    def reenrol(self, gallery: str, source: str) -> ReenrolReport:
        """Re-enrol ``source``'s subjects and stored photos into ``gallery`` with the served
        models (after a model upgrade)."""
        return self._send(_Endpoints.reenrol(gallery, source))

    def export(self, gallery: str) -> bytes:
        """The gallery's export file (``facegate gallery restore`` reads it)."""
        return self._send(_Endpoints.export(gallery))

    def audit(self, **filters: Any) -> AuditPage:
        return self._send(_Endpoints.audit(**filters))


class AsyncClient:
    """The asynchronous client, with the methods of :class:`Client` as coroutines."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self._http = http or httpx.AsyncClient(
            base_url=base_url, headers=_headers(api_key), timeout=timeout
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Call) -> Any:
        return _answer(call, await self._http.request(call.method, call.path, **call.kwargs))

    async def verify(
        self,
        image1: Image | None = None,
        image2: Image | None = None,
        *,
        gallery: str | None = None,
        subject_id: str | None = None,
        embedding: str | None = None,
        model: str | None = None,
        operating_point: str | None = None,
    ) -> VerifyAnswer:
        return await self._send(
            _Endpoints.verify(
                image1,
                image2,
                gallery=gallery,
                subject_id=subject_id,
                embedding=embedding,
                model=model,
                operating_point=operating_point,
            )
        )

    async def identify(
        self,
        gallery: str,
        image: Image | None = None,
        *,
        top_k: int | None = None,
        threshold: float | None = None,
        operating_point: str | None = None,
        embedding: str | None = None,
        model: str | None = None,
    ) -> IdentifyAnswer:
        return await self._send(
            _Endpoints.identify(
                gallery,
                image,
                top_k=top_k,
                threshold=threshold,
                operating_point=operating_point,
                embedding=embedding,
                model=model,
            )
        )

    async def detect(self, image: Image, **options: Any) -> DetectAnswer:
        return await self._send(_Endpoints.detect(image, **options))

    async def embed(self, image: Image, **options: Any) -> EmbedAnswer:
        return await self._send(_Endpoints.embed(image, **options))

    async def info(self) -> InfoAnswer:
        return await self._send(_Endpoints.info())

    async def galleries(self) -> list[GalleryRecord]:
        return await self._send(_Endpoints.galleries())

    async def create_gallery(self, gallery: str) -> GalleryRecord:
        return await self._send(_Endpoints.create_gallery(gallery))

    async def gallery(self, gallery: str) -> GalleryRecord:
        return await self._send(_Endpoints.gallery(gallery))

    async def delete_gallery(self, gallery: str) -> Deleted:
        return await self._send(_Endpoints.delete_gallery(gallery))

    async def create_subject(
        self, gallery: str, subject_id: str, metadata: JSON | None = None
    ) -> SubjectRecord:
        return await self._send(_Endpoints.create_subject(gallery, subject_id, metadata))

    async def subjects(
        self, gallery: str, limit: int = 100, cursor: str | None = None
    ) -> SubjectPage:
        return await self._send(_Endpoints.subjects(gallery, limit, cursor))

    async def subject(self, gallery: str, subject_id: str) -> SubjectRecord:
        return await self._send(_Endpoints.subject(gallery, subject_id))

    async def update_subject(self, gallery: str, subject_id: str, metadata: JSON) -> SubjectRecord:
        return await self._send(_Endpoints.update_subject(gallery, subject_id, metadata))

    async def delete_subject(self, gallery: str, subject_id: str) -> Deleted:
        return await self._send(_Endpoints.delete_subject(gallery, subject_id))

    async def enrol(self, gallery: str, subject_id: str, image: Image) -> EnrolAnswer:
        return await self._send(_Endpoints.enrol(gallery, subject_id, image))

    async def enrol_many(
        self, gallery: str, items: Iterable[tuple[str, Image] | tuple[str, Image, JSON]]
    ) -> BulkAnswer:
        return await self._send(_Endpoints.enrol_many(gallery, items))

    async def delete_face(self, gallery: str, face_id: int) -> Deleted:
        return await self._send(_Endpoints.delete_face(gallery, face_id))

    async def reenrol(self, gallery: str, source: str) -> ReenrolReport:
        return await self._send(_Endpoints.reenrol(gallery, source))

    async def export(self, gallery: str) -> bytes:
        return await self._send(_Endpoints.export(gallery))

    async def audit(self, **filters: Any) -> AuditPage:
        return await self._send(_Endpoints.audit(**filters))
