"""ClickHouse's errors as this endpoint answers them: ``Code: N. DB::Exception: ... (NAME)`` and the HTTP status
ClickHouse gives that code."""

from __future__ import annotations

import re

# ClickHouse's exceptionCodeToHTTPStatus (src/Server/HTTP/exceptionCodeToHTTPStatus.cpp); any other code is 500.
_STATUS_GROUPS: dict[int, tuple[int, ...]] = {
    401: (194,),  # REQUIRED_PASSWORD
    403: (192, 193, 497, 512, 516, 164),  # UNKNOWN_USER, WRONG_PASSWORD, ACCESS_DENIED, ..., READONLY
    # BAD_ARGUMENTS, CANNOT_PARSE_*, ILLEGAL_COLUMN, SYNTAX_ERROR, INCORRECT_DATA, TYPE_MISMATCH...
    # ... and SETTING_CONSTRAINT_VIOLATION (a limit of this endpoint's profile).
    400: (
        36,
        427,
        6,
        25,
        26,
        38,
        41,
        72,
        441,
        675,
        676,
        27,
        376,
        15,
        44,
        37,
        123,
        8,
        167,
        168,
        223,
        62,
        117,
        53,
        321,
        452,
    ),
    # UNKNOWN_TABLE, UNKNOWN_FUNCTION, UNKNOWN_IDENTIFIER, UNKNOWN_DATABASE, UNKNOWN_SETTING, UNKNOWN_FORMAT...
    404: (60, 46, 47, 50, 56, 81, 115, 152, 63, 73, 336, 78, 511),
    408: (159,),  # TIMEOUT_EXCEEDED
    411: (381,),  # HTTP_LENGTH_REQUIRED
    413: (229,),  # QUERY_IS_TOO_LARGE
    415: (779,),  # UNSUPPORTED_MEDIA_TYPE
    501: (48,),  # NOT_IMPLEMENTED
    503: (209, 76, 439, 202),  # SOCKET_TIMEOUT, CANNOT_OPEN_FILE, CANNOT_SCHEDULE_TASK, TOO_MANY_SIMULTANEOUS_QUERIES
}
_STATUS_BY_CODE = {code: status for status, codes in _STATUS_GROUPS.items() for code in codes}

NOT_IMPLEMENTED = 48
SYNTAX_ERROR = 62
TOO_MANY_SIMULTANEOUS_QUERIES = 202
QUERY_IS_TOO_LARGE = 229
SETTING_CONSTRAINT_VIOLATION = 452
ACCESS_DENIED = 497
UNKNOWN_COMPRESSION_METHOD = 89
READONLY = 164
CANNOT_DECOMPRESS = 271
SESSION_NOT_FOUND = 372
SESSION_IS_LOCKED = 373
AUTHENTICATION_FAILED = 516
UNKNOWN_EXCEPTION = 1002

_CODE_RE = re.compile(r"Code: (\d+)\.")
_NAME_BY_CODE = {
    48: "NOT_IMPLEMENTED",
    62: "SYNTAX_ERROR",
    202: "TOO_MANY_SIMULTANEOUS_QUERIES",
    229: "QUERY_IS_TOO_LARGE",
    452: "SETTING_CONSTRAINT_VIOLATION",
    497: "ACCESS_DENIED",
    89: "UNKNOWN_COMPRESSION_METHOD",
    164: "READONLY",
    271: "CANNOT_DECOMPRESS",
    372: "SESSION_NOT_FOUND",
    373: "SESSION_IS_LOCKED",
    516: "AUTHENTICATION_FAILED",
    1002: "UNKNOWN_EXCEPTION",
}


class ClickHouseError(Exception):
    """An error to answer with ClickHouse's text (``Code: N. DB::Exception: ... (NAME)``) and HTTP status."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text

    @classmethod
    def make(cls, code: int, message: str) -> ClickHouseError:
        name = _NAME_BY_CODE.get(code, "UNKNOWN_EXCEPTION")
        return cls(code, f"Code: {code}. DB::Exception: {message}. ({name})")

    @classmethod
    def from_engine(cls, exc: BaseException) -> ClickHouseError:
        """chDB raises RuntimeError/ChdbError whose text holds ClickHouse's message after a wrapper prefix."""
        text = str(exc).strip()
        start = text.find("Code: ")
        if start < 0:
            return cls.make(UNKNOWN_EXCEPTION, text or type(exc).__name__)
        text = text[start:]
        match = _CODE_RE.match(text)
        return cls(int(match.group(1)) if match else UNKNOWN_EXCEPTION, text)

    @property
    def status(self) -> int:
        return http_status(self.code)


def http_status(code: int) -> int:
    return _STATUS_BY_CODE.get(code, 500)
