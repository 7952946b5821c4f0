"""``GET /v1/galleries/{g}/export``: a gallery as the export file of ``facegate gallery export``.

The export is read in one consistent snapshot of the store by one worker thread
and compressed into a spooled temporary file (in memory up to ``SPOOL_BYTES``, then on
disk), which is then streamed to the client; so a slow client never holds a store
transaction open.  The format is described in :mod:`service.gallery.transfer`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from functools import partial

import anyio.to_thread
from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from service.gallery.transfer import MEDIA_TYPE
from service.usecases.transfer import export_gallery as export_to

from .audit import ExportAudit
from .deps import State, require_api_key
from .galleries import GalleryName
from .openapi import ERROR_RESPONSES
from .scopes import require_scope

router = APIRouter(
    prefix="/v1/galleries",
    tags=["galleries"],
    dependencies=[Depends(require_api_key)],
    responses=ERROR_RESPONSES,
)

SPOOL_BYTES = 8 * 1024 * 1024
CHUNK = 256 * 1024


def _chunks(spool) -> Iterator[bytes]:
    try:
        spool.seek(0)
        while data := spool.read(CHUNK):
            yield data
    finally:
        spool.close()


@router.get(
    "/{gallery}/export",
    summary="Export a gallery (gzip JSON lines)",
    dependencies=[require_scope("admin")],
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {MEDIA_TYPE: {}},
            "description": "the export file (`facegate gallery restore`)",
        }
    },
)
async def export_gallery(
    gallery: GalleryName, state: State, _audit: ExportAudit
) -> StreamingResponse:
    """The gallery with its subjects, metadata, faces (exact float32 embeddings, quality
    figures) and stored photos, model id and sha256, in the format that
    ``facegate gallery restore`` reads; 404 ``gallery_not_found``."""
    card = state.pipeline.recognizer_card
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 (closed by _chunks)

    def sha256_of(model_id: str) -> str | None:
        return card.sha256 if card.id == model_id.removesuffix("+flip") else None

    try:
        await anyio.to_thread.run_sync(
            partial(
                export_to,
                store=state.gallery.store,
                gallery=gallery,
                out=spool,
                sha256_of=sha256_of,
            )
        )
    except BaseException:
        spool.close()
        raise
    return StreamingResponse(
        _chunks(spool),
        media_type=MEDIA_TYPE,
        headers={"Content-Disposition": f'attachment; filename="{gallery}.facegate.jsonl.gz"'},
    )
