"""HTTP checks of the Docker smoke test, run against a container on 127.0.0.1.

    python3 docker/smoke_client.py ready    URL [TIMEOUT_S]
    python3 docker/smoke_client.py populate URL LFW_IMAGES STATE_JSON DASHBOARD_JSON
    python3 docker/smoke_client.py persisted URL LFW_IMAGES STATE_JSON
    python3 docker/smoke_client.py replicas URL_1 URL_2 LFW_IMAGES

``populate`` enrols real LFW photos (the first two per person that the service
accepts as one good face; a refused photo must change nothing), verifies same-person and
different-person pairs, identifies a held-out photo of each person, sends a bad
upload (typed error, gallery unchanged), scrapes ``/metrics`` and checks that
every metric the Grafana dashboard queries is exported; it records what it
enrolled in STATE_JSON.  ``persisted`` runs against a fresh container on the
same volume and checks that the gallery came back intact and still identifies.
``replicas`` runs against two containers on one PostgreSQL store: a subject enrolled
through the first is identified by the second, and one deleted through the second
disappears from the first.

Standard library only, so it runs with any Python 3 on the host.
"""

from __future__ import annotations

import json
import re
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

GALLERY = "smoke"
PEOPLE = ["George_W_Bush", "Colin_Powell", "Tony_Blair", "Gerhard_Schroeder"]
ENROLLED_PER_PERSON = 2


class SmokeFailure(AssertionError):
    """A check of the smoke test failed."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeFailure(message)


# --- HTTP -------------------------------------------------------------------------


def request(
    method: str,
    url: str,
    body: bytes | None = None,
    content_type: str | None = None,
    timeout: float = 60,
) -> tuple[int, bytes]:
    headers = {"Content-Type": content_type} if content_type else {}
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def call_json(method: str, url: str, expect: tuple[int, ...] = (200,), **kwargs) -> dict:
    status, raw = request(method, url, **kwargs)
    check(status in expect, f"{method} {url}: HTTP {status} (expected {expect}): {raw[:500]!r}")
    return json.loads(raw)


def multipart(fields: dict[str, str], files: dict[str, Path | bytes]) -> tuple[bytes, str]:
    """Encode form fields and files as ``multipart/form-data``."""
    boundary = uuid.uuid4().hex
    parts: list[bytes] = []
    for name, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
            f"{value}\r\n".encode()
        )
    for name, source in files.items():
        data = source.read_bytes() if isinstance(source, Path) else source
        filename = source.name if isinstance(source, Path) else "upload.jpg"
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{filename}"\r\nContent-Type: image/jpeg\r\n\r\n'.encode()
            + data
            + b"\r\n"
        )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def post_form(
    url: str,
    fields: dict[str, str],
    files: dict[str, Path | bytes],
    expect: tuple[int, ...] = (200,),
) -> dict:
    body, content_type = multipart(fields, files)
    return call_json("POST", url, expect, body=body, content_type=content_type)


# --- steps ------------------------------------------------------------------------


def wait_ready(base: str, timeout_s: float) -> dict:
    """Poll ``/readyz`` until it answers 200."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            status, raw = request("GET", f"{base}/readyz", timeout=5)
            if status == 200:
                return json.loads(raw)
            last = f"HTTP {status}: {raw[:200]!r}"
        except OSError as exc:
            last = str(exc)
        time.sleep(1)
    raise SmokeFailure(f"{base}/readyz not ready after {timeout_s:.0f}s ({last})")


def photos(lfw_images: Path) -> dict[str, list[Path]]:
    """Each person's LFW photos, sorted by name."""
    chosen = {}
    for name in PEOPLE:
        files = sorted((lfw_images / name).glob("*.jpg"))
        check(len(files) >= ENROLLED_PER_PERSON + 2, f"too few LFW photos of {name}")
        chosen[name] = files
    return chosen


def enrol(base: str, name: str, files: list[Path]) -> tuple[list[Path], Path]:
    """Enrol the first photos the service accepts (exactly one good face); return them
    and the next photo, held out for identification.  A refused photo must leave the
    subject unchanged."""
    url = f"{base}/v1/galleries/{GALLERY}/subjects/{name}"
    enrolled: list[Path] = []
    for path in files:
        if len(enrolled) == ENROLLED_PER_PERSON:
            return enrolled, path
        body, content_type = multipart({}, {"image": path})
        status, raw = request("POST", f"{url}/faces", body, content_type)
        if status == 422:  # several faces, a small or a poor face: the next photo
            code = json.loads(raw)["error"]["code"]
            faces = call_json("GET", url)["faces"]
            check(
                len(faces) == len(enrolled),
                f"refused photo {path.name} ({code}) changed {name}: {len(faces)} faces",
            )
            continue
        check(status == 201, f"enrol {path.name}: HTTP {status}: {raw[:300]!r}")
        check(json.loads(raw)["subject_id"] == name, f"{path.name} enrolled under another id")
        enrolled.append(path)
    raise SmokeFailure(f"the service accepted only {len(enrolled)} photos of {name}")


def subject_ids(base: str) -> list[str]:
    ids, cursor = [], None
    while True:
        query = "?limit=100" + (f"&cursor={cursor}" if cursor else "")
        page = call_json("GET", f"{base}/v1/galleries/{GALLERY}/subjects{query}")
        ids.extend(s["subject_id"] for s in page["subjects"])
        cursor = page.get("next_cursor")
        if not cursor:
            return sorted(ids)


def identify_all(base: str, held_out: dict[str, Path]) -> dict[str, dict]:
    """Identify each held-out photo; the best candidate must be its own subject."""
    results = {}
    for name, path in held_out.items():
        answer = post_form(
            f"{base}/v1/identify", {"gallery": GALLERY, "top_k": "3"}, {"image": path}
        )
        check(len(answer["faces"]) >= 1, f"identify found no face in {path.name}")
        face = max(
            answer["faces"], key=lambda f: (f["box"][2] - f["box"][0]) * (f["box"][3] - f["box"][1])
        )
        top = face["candidates"][0]
        check(top["subject_id"] == name, f"identify {path.name}: top candidate {top} is not {name}")
        check(face["match"] == name, f"identify {path.name}: match {face['match']!r}")
        results[name] = {
            "photo": path.name,
            "similarity": top["similarity"],
            "threshold": answer["threshold"],
        }
    return results


def metric_names(text: str) -> set[str]:
    return {
        line.split("{")[0].split(" ")[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def dashboard_metrics(dashboard: Path) -> set[str]:
    """Every ``facegate_*`` series the dashboard's queries read."""
    exprs = []
    for panel in json.loads(dashboard.read_text())["panels"]:
        exprs.extend(t["expr"] for t in panel.get("targets", []))
    return set(re.findall(r"\bfacegate_[a-z_]+\b", " ".join(exprs)))


def populate(base: str, lfw_images: Path, state_path: Path, dashboard: Path) -> None:
    info = call_json("GET", f"{base}/v1/info")
    models = info["models"]
    print(
        f"serving detector {models['detector']['id']} ({models['detector']['providers']}), "
        f"recognizer {models['recognizer']['id']} ({models['recognizer']['providers']})"
    )
    chosen = photos(lfw_images)

    enrolled, held_out = {}, {}
    for name, files in chosen.items():
        call_json(
            "POST",
            f"{base}/v1/galleries/{GALLERY}/subjects",
            (200, 201),
            body=json.dumps({"subject_id": name, "metadata": {"source": "lfw"}}).encode(),
            content_type="application/json",
        )
        enrolled[name], held_out[name] = enrol(base, name, files)
    check(subject_ids(base) == sorted(PEOPLE), f"gallery holds {subject_ids(base)}")
    print("enrolled: " + ", ".join(p.name for ps in enrolled.values() for p in ps))

    a, b = PEOPLE[0], PEOPLE[1]
    same = post_form(f"{base}/v1/verify", {}, {"image1": enrolled[a][0], "image2": held_out[a]})
    check(same["match"] is True, f"same person ({a}) not matched: {same}")
    diff = post_form(f"{base}/v1/verify", {}, {"image1": enrolled[a][0], "image2": enrolled[b][0]})
    check(diff["match"] is False, f"different people ({a}, {b}) matched: {diff}")
    check(same["similarity"] > diff["similarity"], "same-person score not above different-person")
    to_subject = post_form(
        f"{base}/v1/verify", {"gallery": GALLERY, "subject_id": b}, {"image1": held_out[b]}
    )
    check(to_subject["match"] is True, f"{b} held-out photo does not verify against {b}")
    print(
        f"verify: same {same['similarity']:.3f}, different {diff['similarity']:.3f}, "
        f"threshold {same['threshold']:.3f} ({same['operating_point']}); "
        f"vs enrolled subject {to_subject['similarity']:.3f}"
    )

    identified = identify_all(base, held_out)
    print("identify: " + ", ".join(f"{n} {r['similarity']:.3f}" for n, r in identified.items()))

    status, raw = request(
        "POST",
        f"{base}/v1/galleries/{GALLERY}/subjects/{a}/faces",
        *multipart({}, {"image": b"this is not an image"}),
    )
    check(status in (400, 415, 422), f"bad upload answered HTTP {status}: {raw[:200]!r}")
    check("error" in json.loads(raw), f"bad upload error is not typed: {raw[:200]!r}")
    faces_before = {
        n: len(call_json("GET", f"{base}/v1/galleries/{GALLERY}/subjects/{n}")["faces"])
        for n in PEOPLE
    }
    check(
        all(c == ENROLLED_PER_PERSON for c in faces_before.values()),
        f"faces per subject after a bad upload: {faces_before}",
    )

    status, raw = request("GET", f"{base}/metrics")
    check(status == 200, f"/metrics answered HTTP {status}")
    text = raw.decode()
    exported = metric_names(text)
    wanted = dashboard_metrics(dashboard)
    missing = sorted(m for m in wanted if m not in exported)
    check(not missing, f"dashboard queries metrics that /metrics does not export: {missing}")
    verify_count = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("facegate_http_requests_total{")
        and 'route="/v1/verify"' in line
        and 'status="200"' in line
    )
    check(verify_count >= 3, f"/metrics counts {verify_count} verify requests, sent 3")
    print(f"metrics: {len(exported)} series names, the dashboard's {len(wanted)} all exported")

    state_path.write_text(
        json.dumps(
            {"subjects": sorted(PEOPLE), "faces": faces_before, "identify": identified}, indent=2
        )
    )


def persisted(base: str, lfw_images: Path, state_path: Path) -> None:
    state = json.loads(state_path.read_text())
    check(
        subject_ids(base) == state["subjects"],
        f"after restart the gallery holds {subject_ids(base)}, expected {state['subjects']}",
    )
    for name, count in state["faces"].items():
        faces = call_json("GET", f"{base}/v1/galleries/{GALLERY}/subjects/{name}")["faces"]
        check(len(faces) == count, f"after restart {name} has {len(faces)} faces, expected {count}")
    held_out = {name: lfw_images / name / r["photo"] for name, r in state["identify"].items()}
    identified = identify_all(base, held_out)
    for name, result in identified.items():
        before = state["identify"][name]["similarity"]
        check(
            abs(result["similarity"] - before) < 1e-3,
            f"{name}: similarity {result['similarity']:.4f} after restart, {before:.4f} before",
        )
    print(f"after restart: {len(state['subjects'])} subjects, faces and scores unchanged")


def wait_for(what: str, probe, timeout_s: float = 20.0) -> float:
    """Poll ``probe()`` until it is true; return the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if probe():
            return time.monotonic() - start
        time.sleep(0.1)
    raise SmokeFailure(f"{what}: not within {timeout_s:.0f}s")


def top_match(base: str, path: Path) -> str | None:
    answer = post_form(f"{base}/v1/identify", {"gallery": GALLERY, "top_k": "1"}, {"image": path})
    return answer["faces"][0]["match"] if answer["faces"] else None


def replicas(first: str, second: str, lfw_images: Path) -> None:
    chosen = photos(lfw_images)
    held_out = {}
    for name in PEOPLE[:2]:
        call_json(
            "POST",
            f"{first}/v1/galleries/{GALLERY}/subjects",
            (200, 201),
            body=json.dumps({"subject_id": name}).encode(),
            content_type="application/json",
        )
        _, held_out[name] = enrol(first, name, chosen[name])
    a, b = PEOPLE[0], PEOPLE[1]
    seen = wait_for(
        f"replica 2 identifying {a} enrolled through replica 1",
        lambda: top_match(second, held_out[a]) == a,
    )
    check(subject_ids(second) == sorted(PEOPLE[:2]), f"replica 2 lists {subject_ids(second)}")
    call_json("DELETE", f"{second}/v1/galleries/{GALLERY}/subjects/{b}")
    gone = wait_for(
        f"replica 1 forgetting {b} deleted through replica 2",
        lambda: top_match(first, held_out[b]) != b,
    )
    check(subject_ids(first) == [a], f"replica 1 lists {subject_ids(first)} after the delete")
    print(
        f"replicas: enrolment visible on the other replica after {seen:.2f}s, "
        f"deletion after {gone:.2f}s"
    )


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    command, base = argv[0], argv[1].rstrip("/")
    try:
        if command == "ready":
            body = wait_ready(base, float(argv[2]) if len(argv) > 2 else 180)
            print(f"ready: {body.get('checks')}")
        elif command == "populate":
            populate(base, Path(argv[2]), Path(argv[3]), Path(argv[4]))
        elif command == "persisted":
            persisted(base, Path(argv[2]), Path(argv[3]))
        elif command == "replicas":
            replicas(base, argv[2].rstrip("/"), Path(argv[3]))
        else:
            print(f"unknown command {command!r}\n{__doc__}", file=sys.stderr)
            return 2
    except SmokeFailure as exc:
        print(f"FAIL: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
