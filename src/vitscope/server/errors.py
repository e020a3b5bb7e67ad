"""The one error type of the web API: a 4xx answer with a machine-readable code and a readable detail."""

from __future__ import annotations


class ApiError(Exception):
    """An answer ``{"error": code, "detail": detail}`` with HTTP ``status``.

    ``code`` is stable and meant for the app (``"not_found"``, ``"bad_parameter"``, ``"no_model"``,
    ``"superseded"``, ...); ``detail`` says what went wrong and what to do, for people.
    """

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = int(status)
        self.code = code
        self.detail = detail

    def to_json(self) -> dict[str, str]:
        return {"error": self.code, "detail": self.detail}


def bad_parameter(detail: str) -> ApiError:
    return ApiError(400, "bad_parameter", detail)


def not_found(detail: str) -> ApiError:
    return ApiError(404, "not_found", detail)
