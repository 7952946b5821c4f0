"""Enrolment quality rules on a face's quality figures (``service.api.analysis.face_quality``).

The detector-side floor (face size, detection score) is applied when faces are selected;
these rules judge the aligned face itself and are off unless their setting is above 0:

* ``enroll_min_sharpness``: variance of the Laplacian of the aligned crop -> ``blurred_face``
* ``enroll_max_yaw_ratio``: |nose offset from the eyes' midpoint / eye distance| -> ``face_turned``
* ``enroll_max_roll_deg``: |angle of the eye line| -> ``face_tilted``
"""

from __future__ import annotations

from service.pipeline.errors import BlurredFace, FaceTilted, FaceTurned


def check_enrol_quality(quality: dict, settings) -> None:
    """Raise the first rule ``quality`` breaks (all 422); return when the face passes."""
    floor = settings.enroll_min_sharpness
    if floor > 0 and quality["sharpness"] < floor:
        raise BlurredFace(
            f"the face's sharpness {quality['sharpness']} is under the enrolment "
            f"minimum {floor} (FACEGATE_ENROLL_MIN_SHARPNESS)"
        )
    limit = settings.enroll_max_yaw_ratio
    if limit > 0 and abs(quality["yaw_ratio"]) > limit:
        raise FaceTurned(
            f"the face is turned sideways: yaw ratio {quality['yaw_ratio']} is "
            f"beyond the enrolment limit {limit} (FACEGATE_ENROLL_MAX_YAW_RATIO)"
        )
    limit = settings.enroll_max_roll_deg
    if limit > 0 and abs(quality["roll_deg"]) > limit:
        raise FaceTilted(
            f"the face is tilted by {quality['roll_deg']} degrees, beyond the "
            f"enrolment limit {limit} (FACEGATE_ENROLL_MAX_ROLL_DEG)"
        )
