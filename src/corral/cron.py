"""Cron patterns as Node.js BullMQ reads them, and their next times, with croniter.

Node.js BullMQ computes a scheduler's runs with cron-parser: six fields with the *second first*
(five fields mean second 0), its predefined ``@...`` names, ``L`` for the last day (``5L`` the
last Friday), ``#`` for the nth weekday, and its own rules on the nights daylight saving starts
and ends. croniter (the cron library of the ``bullmq`` Python package) writes some of these
differently and gets zone changes wrong, so :func:`check_cron` translates a pattern to croniter's
form, refusing what cannot mean the same on both sides, and :func:`cron_next` walks the zone's
wall clock itself. ``tests/test_schedules.py`` checks a table of patterns, zones and
daylight-saving days against cron-parser's answers.
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime, timedelta, tzinfo
from functools import cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

from corral.errors import ConfigError

_FIELDS_5 = ("minute", "hour", "day of month", "month", "day of week")
_FIELDS_6 = ("second", *_FIELDS_5)

# cron-parser's predefined expressions (bullmq's cron library), as 6-field patterns: croniter
# lacks @minutely, @secondly, @weekdays and @weekends, and has an @midnight cron-parser lacks.
MACROS = {
    "@yearly": "0 0 0 1 1 *",
    "@annually": "0 0 0 1 1 *",
    "@monthly": "0 0 0 1 * *",
    "@weekly": "0 0 0 * * 0",
    "@daily": "0 0 0 * * *",
    "@hourly": "0 0 * * * *",
    "@minutely": "0 * * * * *",
    "@secondly": "* * * * * *",
    "@weekdays": "0 0 0 * * 1-5",
    "@weekends": "0 0 0 * * 0,6",
}

_LAST_WEEKDAY = re.compile(r"^([0-7])L$", re.IGNORECASE)  # cron-parser's 5L: last Friday
_NTH_WEEKDAY = re.compile(r"^([0-7]|[a-z]{3})#([1-5])$", re.IGNORECASE)
_NOT_PORTABLE = re.compile(r"^H|W$|^L-|^LW$", re.IGNORECASE)
_DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_MONTH_NAMES = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_NAMES = {name: i for i, name in enumerate(_DAY_NAMES)} | {
    name: i for i, name in enumerate(_MONTH_NAMES, start=1)
}


def cron_fields(pattern: str) -> list[str]:
    """``pattern``'s six fields, seconds first (cron-parser's order), with the predefined
    ``@...`` names written out; refuses what corral cannot match the way Node.js BullMQ does:
    fewer than 5 or more than 6 fields, ``H`` (cron-parser draws it at random per process),
    ``W`` and ``L-n``.

    Raises:
        ConfigError: naming the field.
    """
    if not isinstance(pattern, str) or not pattern.strip():
        raise ConfigError(f"cron must be a non-empty string such as '0 3 * * *', got {pattern!r}")
    text = pattern.strip()
    if text.startswith("@"):
        if text not in MACROS:
            raise ConfigError(
                f"cron {pattern!r} is not a known name; use one of {', '.join(MACROS)} "
                "or a pattern of 5 or 6 fields"
            )
        text = MACROS[text]
    fields = text.split()
    if len(fields) not in (5, 6):
        raise ConfigError(
            f"cron {pattern!r} has {len(fields)} fields; use 5 (minute hour day-of-month month "
            "day-of-week) or 6 (a second first, as Node.js BullMQ reads them)"
        )
    names = _FIELDS_5 if len(fields) == 5 else _FIELDS_6
    for position, (value, name) in enumerate(zip(fields, names, strict=True), start=1):
        where = f"cron {pattern!r}: field {position} ({name}) {value!r}"
        for part in value.split(","):
            if _NOT_PORTABLE.search(part):
                raise ConfigError(f"{where} uses a form corral does not support (H, W or L-n)")
            low, dash, high = part.partition("/")[0].partition("-")
            first, last = _number(low), _number(high)
            if dash and first is not None and last is not None and first > last:
                raise ConfigError(f"{where} has a range that runs backwards ({part})")
        if name == "day of week" and "#" in value and ("," in value or "-" in value):
            raise ConfigError(f"{where} combines '#' with ',' or '-', which Node.js refuses")
    if len(fields) == 5:
        fields.insert(0, "0")
    return fields


def _number(text: str) -> int | None:
    if text.isdigit():
        return int(text)
    return _NAMES.get(text.lower())


@cache
def check_cron(pattern: str) -> str:
    """``pattern`` as croniter reads it (minute hour day month weekday second), meaning what it
    means to Node.js BullMQ's cron-parser.

    Raises:
        ConfigError: naming the first field that is wrong, or saying that it never matches.
    """
    fields = cron_fields(pattern)
    given = 6 if pattern.strip().startswith("@") else len(pattern.split())
    names = _FIELDS_6 if given == 6 else _FIELDS_5
    for index, value in enumerate(fields):
        probe = ["0", "*", "*", "*", "*", "*"]
        try:
            probe[index] = fields[index] = _weekdays(value) if index == 5 else value
            croniter(" ".join(probe[1:] + probe[:1]))
        except (ValueError, KeyError, TypeError) as exc:
            position = index + 1 if given == 6 else index
            name = names[position - 1]
            raise ConfigError(
                f"cron {pattern!r}: field {position} ({name}) {value!r} is "
                f"{_cron_reason(exc, name)}"
            ) from None
    dom_raw, dow_raw = fields[3], fields[5]
    # Both days restricted means either matches (cron's rule), but croniter takes a field that
    # lists every day for no restriction at all; cron-parser goes by the text.
    if (
        dom_raw not in ("*", "?")
        and dow_raw not in ("*", "?")
        and (_covers_all(dom_raw, 2) or _covers_all(dow_raw, 4))
    ):
        raise ConfigError(
            f"cron {pattern!r}: a day field that lists every day beside a restricted one "
            "reads differently in Node.js; write '*' for it"
        )
    normalized = " ".join(fields[1:] + fields[:1])
    try:
        croniter(normalized, datetime(2000, 1, 1)).get_next(datetime)
    except CroniterBadDateError:
        raise ConfigError(f"cron {pattern!r} never matches a date") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cron {pattern!r} is not valid: {_cron_reason(exc)}") from None
    return normalized


def _weekdays(value: str) -> str:
    """A day-of-week field with Sunday as 0 throughout: croniter's six-field form misses a
    Sunday written 7 (cron-parser's ``5-7``), and writes the last Friday ``L5`` (``5L``)."""
    if value in ("*", "?"):
        return value
    parts: list[str] = []
    for part in value.split(","):
        last = _LAST_WEEKDAY.match(part)
        nth = _NTH_WEEKDAY.match(part)
        if last:
            parts.append(f"L{int(last.group(1)) % 7}")
        elif nth:
            parts.append(f"{(_number(nth.group(1)) or 0) % 7}#{nth.group(2)}")
        else:
            days = croniter.expand(f"* * * * {part}")[0][4]
            parts.append("0-6" if days == ["*"] else ",".join(str(day) for day in days))
    return ",".join(parts)


def _covers_all(value: str, index: int) -> bool:
    try:
        probe = " ".join(value if i == index else "*" for i in range(5))
        return bool(croniter.expand(probe)[0][index] == ["*"])
    except (ValueError, KeyError, TypeError):
        return False


_RANGES = {
    "second": "0-59",
    "minute": "0-59",
    "hour": "0-23",
    "day of month": "1-31 or L",
    "month": "1-12 or JAN-DEC",
    "day of week": "0-7 or SUN-SAT, nL, n#k",
}


def _cron_reason(exc: Exception, field: str | None = None) -> str:
    text = str(exc)
    allowed = f"; it takes {_RANGES[field]}" if field in _RANGES else ""
    if "out of range" in text:
        return f"out of range{allowed}"
    if "zero" in text:
        return "a step of 0"
    return f"not a value, range, step or list cron reads{allowed}"


def zone(tz: str | None) -> tzinfo:
    """The zone named ``tz``; without one, this process's local zone (what Node.js BullMQ uses
    for a pattern without ``tz``: only schedules written by others lack one)."""
    if tz:
        return ZoneInfo(tz)
    return _local_zone()


@cache
def _local_zone() -> tzinfo:
    name = os.environ.get("TZ", "").lstrip(":")
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    try:
        with open("/etc/localtime", "rb") as localtime:
            return ZoneInfo.from_file(localtime)
    except OSError:
        local = datetime.now().astimezone().tzinfo
        return local if local is not None else UTC


def check_tz(tz: Any) -> str:
    """``tz`` if it names an IANA time zone, else ConfigError."""
    if not isinstance(tz, str) or not tz.strip():
        raise ConfigError(f"tz must be an IANA time zone name such as 'Europe/Lisbon', got {tz!r}")
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"tz {tz!r} is not a known time zone; use an IANA name such as 'Europe/Lisbon' or 'UTC'"
        ) from None
    return tz


def cron_next(
    base_ms: int, pattern: str, tz: str | None, start_ms: int | None, end_ms: int | None
) -> int | None:
    """The first time matching ``pattern`` strictly after ``base_ms`` (and not before
    ``start_ms``), in whole seconds as epoch ms; ``None`` if that is after ``end_ms`` or the
    pattern cannot be read. Node.js BullMQ's ``defaultRepeatStrategy``: cron-parser's meaning,
    computed with croniter on the zone's wall clock (croniter's own zone arithmetic goes wrong
    across daylight-saving changes).

    Daylight saving, as cron-parser: on the night clocks go forward, a pattern of certain hours
    whose time falls in the skipped hour runs when the clock lands (02:30 runs at 03:30), and one
    of every hour runs at the times that exist. On the night they go back, a pattern of certain
    hours runs once in the repeated hour (the first time), one of every hour runs in both.
    """
    if start_ms is not None and start_ms > base_ms:
        base_ms = start_ms
    try:
        fields = check_cron(pattern)
        found = _cron_after(base_ms, fields, zone(tz))
    except (ConfigError, CroniterBadDateError, ZoneInfoNotFoundError, ValueError, OverflowError):
        return None
    if found is None or (end_ms is not None and found > end_ms):
        return None
    return found


_FOLD_WINDOW = timedelta(hours=3)  # longer than any daylight-saving shift


def _cron_after(base_ms: int, fields: str, tz: tzinfo) -> int | None:
    base_s = base_ms // 1000
    base = datetime.fromtimestamp(base_s, tz)
    itr = croniter(fields, base.replace(tzinfo=None))
    every_hour = itr.expanded[1] == ["*"]
    best = _first_after(itr, tz, every_hour, base)
    if every_hour:
        fold = _fall_back_after(base, tz)
        if fold is not None and (best is None or best > fold[0] * 1000):
            # The clock goes back before that: the repeated wall times come round again, and
            # a pattern of every hour runs in them a second time (cron-parser does).
            transition_s, fold_wall = fold
            again = croniter(fields, fold_wall - timedelta(seconds=1)).get_next(datetime)
            instant = int(again.replace(tzinfo=tz, fold=1).timestamp())
            if instant >= transition_s and (best is None or instant * 1000 < best):
                best = instant * 1000
    return best


def _first_after(itr: Any, tz: tzinfo, every_hour: bool, base: datetime) -> int | None:
    base_s = int(base.timestamp())
    while True:
        candidate: datetime = itr.get_next(datetime)
        instants = [
            int(instant.timestamp())
            for instant in _instants(candidate, tz, every_hour, base.utcoffset())
        ]
        later = [seconds for seconds in instants if seconds > base_s]
        if later:
            return min(later) * 1000


def _fall_back_after(moment: datetime, tz: tzinfo) -> tuple[int, datetime] | None:
    """When the clock goes back within the next hours (epoch s), and the wall time it goes
    back to; ``None`` if it does not."""
    offset = moment.utcoffset()
    start = int(moment.timestamp())
    end = start + int(_FOLD_WINDOW.total_seconds())
    later = datetime.fromtimestamp(end, tz).utcoffset()
    if offset is None or later is None or later >= offset:
        return None
    low, high = start, end  # offset(low) == offset, offset(high) != offset
    while high - low > 1:
        middle = (low + high) // 2
        if datetime.fromtimestamp(middle, tz).utcoffset() == offset:
            low = middle
        else:
            high = middle
    return high, datetime.fromtimestamp(high, tz).replace(tzinfo=None)


def _instants(wall: datetime, tz: tzinfo, every_hour: bool, prefer: Any) -> list[datetime]:
    """The instants a wall-clock time of ``tz`` stands for, as cron-parser counts them."""
    first, second = wall.replace(tzinfo=tz, fold=0), wall.replace(tzinfo=tz, fold=1)
    if first.utcoffset() == second.utcoffset():
        return [first]
    if not _exists(wall, tz):
        # Skipped by the clock. cron-parser moves a time of certain hours to when the clock
        # lands (fold=0 is that instant), unless the day itself starts in the gap.
        midnight = wall.replace(hour=0, minute=0, second=0)
        return [] if every_hour or not _exists(midnight, tz) else [first]
    if every_hour:
        return [first, second]
    return [second] if second.utcoffset() == prefer else [first]


def _exists(wall: datetime, tz: tzinfo) -> bool:
    return (
        datetime.fromtimestamp(wall.replace(tzinfo=tz).timestamp(), tz).replace(tzinfo=None) == wall
    )
