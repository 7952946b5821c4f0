"""Use cases: what the service does, once, for every front end.

Plain keyword-only functions (verify, identify, detect/embed, gallery work) that take the
narrow collaborators they need (a :class:`~service.usecases.work.Worker` over the
pipeline, the gallery, the caller's gallery check) and return frozen, typed results.
The HTTP routes (``service/api``) and the CLI commands (``service/commands``) parse their
input, call one of these and shape the answer, so a route and its CLI twin cannot drift.
A use case checks its preconditions (gallery exists for this model, subject exists)
once, before any image work.  Nothing here knows HTTP or the command line.
"""
