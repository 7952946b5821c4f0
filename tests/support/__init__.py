"""Helpers shared by the test areas: servers (``service``), PostgreSQL (``pg``),
replicas, the FaceNet reference."""
