"""Server settings: every RECSVC_* environment variable, read and converted in one place."""

from __future__ import annotations

import os
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from recsvc.errors import ConfigError

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


def _text(env: Mapping[str, str], name: str, default: str | None) -> str | None:
    value = env.get(name)
    return default if value is None or value.strip() == "" else value.strip()


def _number(env: Mapping[str, str], name: str, default: float, *, minimum: float, maximum: float) -> float:
    raw = _text(env, name, None)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if not minimum <= value <= maximum:
        raise ConfigError(f"{name}={raw!r} must be between {_shown(minimum)} and {_shown(maximum)}")
    return value


def _integer(env: Mapping[str, str], name: str, default: int, *, minimum: int, maximum: int) -> int:
    """A count (workers, bytes, failures): 2.5 is refused, not silently read as 2."""
    value = _number(env, name, default, minimum=minimum, maximum=maximum)
    if not float(value).is_integer():
        raise ConfigError(f"{name}={_text(env, name, None)!r} must be a whole number")
    return int(value)


def redis_url_problem(url: str) -> str | None:
    """Why `url` is no Redis URL recsvc can use, or None. redis-py itself would read a database such as
    /abc as database 0, and raise a bare ValueError for an http:// URL."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError as exc:  # its text may quote part of a password: say it in our words
        return ("the port after the host is not a number (percent-encode '/', '?', '#' and '@' in a password)"
                if "Port" in str(exc) else "it cannot be read as a URL")
    if parts.scheme not in ("redis", "rediss", "unix"):
        return "it must start with redis://, rediss:// or unix://"
    database = parts.path.lstrip("/")
    if parts.scheme != "unix" and "@" in database:  # a '/' in the password: what follows it is no database
        return "the database after the host is not a number (percent-encode '/', '?', '#' and '@' in a password)"
    if parts.scheme != "unix" and database and not database.isdigit():
        return f"the database after the host must be a number, not {database!r}"
    import redis  # here: the trainer reads settings without needing redis-py

    try:  # what redis-py itself makes of the query (?password=, ?socket_timeout=...), without connecting
        redis.ConnectionPool.from_url(url).make_connection()
    except (TypeError, ValueError) as exc:
        return f"redis-py cannot use it ({exc})"
    return None


def redacted_url(url: str) -> str:
    """`url` as messages and logs show it: user name and password (everything before the host's '@') and a
    password= query value become ***, so an error message never prints a secret."""
    # Up to the last '@', whatever the URL parser makes of it: a password may hold '/', '#' or '?' unescaped.
    shown = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)?.*@", r"\1***@", url, flags=re.DOTALL)
    return re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", shown)


def checked_redis_url(url: str, option: str) -> str:
    """`url`, or ConfigError naming it as `option` (RECSVC_REDIS_URL, --redis-url), shown without its password,
    and saying why."""
    problem = redis_url_problem(url)
    if problem:
        shown = redacted_url(url)
        label = f"{option}={shown!r}" if option.startswith("RECSVC_") else f"{option} {shown!r}"
        raise ConfigError(f"{label} is not a Redis URL: {problem}")
    return url


def _redis_url(env: Mapping[str, str], name: str) -> str | None:
    url = _text(env, name, None)
    return url and checked_redis_url(url, name)


def _local_cache_bytes(env: Mapping[str, str], name: str, default: int, entries: int) -> int:
    """The shared table's size: it must hold at least one list, or the cache (and, with or without Redis, the
    recent items every worker reads) would be silently off."""
    from recsvc.cache import LocalCache  # here: recsvc.cache imports this module

    return _integer(env, name, default, minimum=LocalCache.smallest_bytes(entries), maximum=64 * 2**30)


def _directory(env: Mapping[str, str], name: str, default: Path) -> Path:
    """A directory the server creates files in: refused at start-up when it, or the nearest part of it that
    exists, is not a directory it may write to (otherwise every write would fail later, on a request)."""
    path = Path(_text(env, name, str(default)))
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{name}={str(path)!r} must be a directory, and {str(existing)!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{name}={str(path)!r}: this user may not write in {str(existing)!r}")
    return path


def _registry(env: Mapping[str, str], name: str, default: Path) -> Path:
    """The registry may appear later (a volume mounted after start, the first `recsvc-train fit`): only a file
    where it goes is refused at once, since it could never become one."""
    path = Path(_text(env, name, str(default)))
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{name}={str(path)!r} must be a directory (the model registry), and it is a file")
    return path


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def gunicorn_settings(env: Mapping[str, str] | None = None) -> dict:
    """RECSVC_BIND, RECSVC_WORKERS, RECSVC_THREADS and RECSVC_LOG_LEVEL for recsvc/gunicorn_conf.py, checked
    like every other setting (ConfigError naming the variable), so `recsvc serve` can refuse them with exit 2."""
    env = os.environ if env is None else env
    bind = _text(env, "RECSVC_BIND", "127.0.0.1:8000")
    host, _, port = bind.rpartition(":")
    if not bind.startswith("unix:") and not (host and port.isdigit() and 1 <= int(port) <= 65535):
        raise ConfigError(f"RECSVC_BIND={bind!r} must be HOST:PORT (e.g. 0.0.0.0:8000) or unix:PATH")
    level = _text(env, "RECSVC_LOG_LEVEL", "info").lower()
    if level not in LOG_LEVELS:
        raise ConfigError(f"RECSVC_LOG_LEVEL={level!r} must be one of {', '.join(LOG_LEVELS)}")
    return {"bind": bind, "loglevel": level,
            "workers": _integer(env, "RECSVC_WORKERS", min(4, os.cpu_count() or 1), minimum=1, maximum=64),
            "threads": _integer(env, "RECSVC_THREADS", 2, minimum=1, maximum=64)}


def _shown(bound: float) -> str:
    """67108864, not 6.71089e+07; 0.05 as 0.05."""
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = _text(env, name, None)
    if raw is None:
        return default
    if raw.lower() in TRUE:
        return True
    if raw.lower() in FALSE:
        return False
    raise ConfigError(f"{name}={raw!r} must be one of {', '.join(TRUE + FALSE)}")


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = (_text(env, name, default) or default).lower()
    if value not in choices:
        raise ConfigError(f"{name}={value!r} must be one of {', '.join(choices)}")
    return value


def _keys(env: Mapping[str, str], name: str) -> frozenset[str]:
    keys = frozenset(k.strip() for k in (env.get(name) or "").split(",") if k.strip())
    short = [k for k in keys if len(k) < 8]
    if short:
        raise ConfigError(f"{name}: every key needs at least 8 characters ({len(short)} shorter)")
    return keys


ANY_ORIGIN = "*"
_HOST = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*|\[[0-9a-f:.]+\]")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origins(env: Mapping[str, str], name: str) -> frozenset[str]:
    """The origins browsers may call the API from (CORS), as they write them in the Origin header; {'*'} for any.
    Empty (unset): no CORS headers at all."""
    listed = [part.strip() for part in (env.get(name) or "").split(",") if part.strip()]
    if ANY_ORIGIN in listed and len(listed) > 1:
        raise ConfigError(f"{name}: '*' allows every origin and stands alone, not in a list of origins")
    return frozenset(listed if listed == [ANY_ORIGIN] else (_origin(name, text) for text in listed))


def _origin(name: str, text: str) -> str:
    """`text` in the form a browser sends in Origin (scheme://host[:port], lower case, no default port), or
    ConfigError: an origin that differs from it in any character would never match."""
    example = "e.g. https://agents.example.com or http://localhost:3000"
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError:
        raise ConfigError(f"{name}: {text!r} is not an origin: the port after the host must be a number "
                          f"from 1 to 65535 ({example})") from None
    scheme, host = parts.scheme.lower(), parts.hostname or ""  # hostname: lower case, IPv6 without brackets
    host = f"[{host}]" if ":" in host else host
    if scheme not in _DEFAULT_PORTS or not text.lower().startswith(f"{scheme}://"):
        problem = "it must start with https:// or http://"
    elif parts.path or "?" in text or "#" in text:
        problem = "an origin is scheme://host[:port] with no path (not even a trailing '/'), query or fragment"
    elif "@" in parts.netloc:
        problem = "an origin holds no user name or password"
    elif not _HOST.fullmatch(host):
        problem = "the host must be a name in ASCII (punycode, as browsers send it) or an IP address"
    elif port == 0:
        problem = "the port must be from 1 to 65535"
    else:
        return f"{scheme}://{host}" + (f":{port}" if port is not None and port != _DEFAULT_PORTS[scheme] else "")
    raise ConfigError(f"{name}: {text!r} is not an origin: {problem} ({example})")


@dataclass(frozen=True)
class Settings:
    # Model registry: the directory the trainer publishes into.
    registry: Path = Path("var/registry")
    reload_interval: float = 5.0  # seconds between checks of the registry's CURRENT pointer and the experiments file

    # Cache: Redis when a URL is set, otherwise the embedded cache (shared memory, one table for all workers).
    redis_url: str | None = None
    cache_ttl: float = 300.0  # seconds a cached recommendation list lives
    redis_timeout: float = 0.05  # seconds, for connecting and for each command
    local_cache_entries: int = 100_000  # lists; by default the byte bound is reached first (~15,000 lists)
    local_cache_bytes: int = 8 * 2**20  # the whole embedded cache, shared by the server's workers
    cache_max_entry_bytes: int = 64 * 1024  # a larger list is served but not cached
    cache_lock_wait: float = 0.05  # seconds a miss waits for another request computing the same list
    redis_breaker_failures: int = 3  # consecutive Redis failures that open the circuit breaker
    redis_breaker_cooldown: float = 1.0  # seconds the breaker stays open before one probe

    # Security: secure by default; auth can only be switched off explicitly.
    api_keys: frozenset[str] = field(default_factory=frozenset)
    admin_keys: frozenset[str] = field(default_factory=frozenset)
    auth_disabled: bool = False
    max_body_bytes: int = 64 * 1024
    rate_limit: float = 0.0  # requests per second per API key in each worker; 0: no limit
    rate_burst: int = 50  # requests a key may send at once above the rate
    # Origins of browser-based agent desktops that may call the API (recsvc/api/cors.py); {"*"}: any; empty: none.
    cors_origins: frozenset[str] = field(default_factory=frozenset)

    # Experiments file (JSON or TOML); none by default.
    experiments_path: Path | None = None

    # Event log (recsvc/event_log.py): Redis Streams, spooled here while Redis is down (the log without Redis).
    spool_dir: Path = Path("var/spool")
    spool_fsync: str = "always"  # always: fsync before answering; everysec: at most ~1 s lost on power failure
    event_dedupe_ttl: float = 7 * 86400  # seconds a record's key blocks a duplicate (retry, replay)
    recent_items_ttl: float = 86400.0  # seconds items from POST /v1/events count as the customer's own

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """Read RECSVC_* variables; raises ConfigError naming the variable on a wrong value."""
        env = os.environ if env is None else env
        experiments = _text(env, "RECSVC_EXPERIMENTS", None)
        auth = (_text(env, "RECSVC_AUTH", "on") or "on").lower()
        if auth not in ("on", "off"):
            raise ConfigError(f"RECSVC_AUTH={auth!r} must be 'on' or 'off' (off: local development only)")
        entries = _integer(env, "RECSVC_LOCAL_CACHE_ENTRIES", cls.local_cache_entries, minimum=1,
                           maximum=10_000_000)
        return cls(
            registry=_registry(env, "RECSVC_REGISTRY", cls.registry),
            reload_interval=_number(env, "RECSVC_RELOAD_INTERVAL", cls.reload_interval, minimum=0.1, maximum=3600),
            redis_url=_redis_url(env, "RECSVC_REDIS_URL"),
            cache_ttl=_number(env, "RECSVC_CACHE_TTL", cls.cache_ttl, minimum=1, maximum=7 * 86400),
            redis_timeout=_number(env, "RECSVC_REDIS_TIMEOUT_MS", cls.redis_timeout * 1000, minimum=1,
                                  maximum=10_000) / 1000,
            local_cache_entries=entries,
            local_cache_bytes=_local_cache_bytes(env, "RECSVC_LOCAL_CACHE_BYTES", cls.local_cache_bytes, entries),
            cache_max_entry_bytes=cache_max_entry_bytes(env),
            cache_lock_wait=_number(env, "RECSVC_CACHE_LOCK_WAIT_MS", cls.cache_lock_wait * 1000, minimum=0,
                                    maximum=10_000) / 1000,
            redis_breaker_failures=_integer(env, "RECSVC_REDIS_BREAKER_FAILURES", cls.redis_breaker_failures,
                                            minimum=1, maximum=1000),
            redis_breaker_cooldown=_number(env, "RECSVC_REDIS_BREAKER_COOLDOWN_MS", cls.redis_breaker_cooldown * 1000,
                                           minimum=10, maximum=600_000) / 1000,
            api_keys=_keys(env, "RECSVC_API_KEYS"),
            admin_keys=_keys(env, "RECSVC_ADMIN_KEYS"),
            auth_disabled=auth == "off",
            rate_limit=_number(env, "RECSVC_RATE_LIMIT", cls.rate_limit, minimum=0, maximum=1_000_000),
            rate_burst=_integer(env, "RECSVC_RATE_BURST", cls.rate_burst, minimum=1, maximum=1_000_000),
            cors_origins=_origins(env, "RECSVC_CORS_ORIGINS"),
            max_body_bytes=_integer(env, "RECSVC_MAX_BODY_BYTES", cls.max_body_bytes, minimum=1024,
                                    maximum=64 * 1024 * 1024),
            experiments_path=Path(experiments) if experiments else None,
            spool_dir=_directory(env, "RECSVC_SPOOL_DIR", cls.spool_dir),
            spool_fsync=_choice(env, "RECSVC_SPOOL_FSYNC", cls.spool_fsync, ("always", "everysec")),
            event_dedupe_ttl=_number(env, "RECSVC_EVENT_DEDUPE_TTL", cls.event_dedupe_ttl, minimum=60,
                                     maximum=365 * 86400),
            recent_items_ttl=_number(env, "RECSVC_RECENT_ITEMS_TTL", cls.recent_items_ttl, minimum=1,
                                     maximum=365 * 86400),
        )


def cache_max_entry_bytes(env: Mapping[str, str] | None = None) -> int:
    """RECSVC_CACHE_MAX_ENTRY_BYTES: a larger list is served but not cached. The cache warm-up reads this one alone,
    so that a setting only the server uses (keys, spool directory) cannot stop it."""
    env = os.environ if env is None else env
    return _integer(env, "RECSVC_CACHE_MAX_ENTRY_BYTES", Settings.cache_max_entry_bytes, minimum=1024,
                    maximum=16 * 1024 * 1024)


def check_server_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Every setting the server reads, checked before it serves, by `recsvc serve` and by gunicorn_conf.py (the
    image starts gunicorn itself): the RECSVC_* values, gunicorn's, and the experiments file. ConfigError names
    the first wrong one."""
    settings = Settings.from_env(env)
    gunicorn_settings(env)
    from recsvc.experiments import load_experiments  # here: it loads the metrics module (see gunicorn_conf.py)

    load_experiments(settings.experiments_path)
    return settings
