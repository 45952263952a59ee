"""The one exception type the engine raises for problems the user can fix."""

from __future__ import annotations


class EngineError(Exception):
    """A job failure with a stable machine-readable ``code``.

    The worker copies ``code``, ``message`` and ``param`` into the job's ``error``
    object, so messages are written for the person who submitted the job.

    Codes: ``weights_mismatch``, ``non_finite_loss``, ``invalid_data``,
    ``invalid_spec``, ``invalid_architecture``.
    """

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"EngineError(code={self.code!r}, message={self.message!r}, param={self.param!r})"

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "param": self.param}
