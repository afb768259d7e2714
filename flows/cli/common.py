"""What every ``xwin`` command shares: option types, the readers of user files (RenderSpec, any JSON/YAML mapping)
with one-line errors, the checks made before anything is created (sources, render backend, store, Prefect server),
the store opener with one-line errors, the one way to name a dataset (:func:`resolve_dataset`) and a volume
(:func:`resolve_volumes`), quiet Prefect defaults, help that reads at 80 columns, and the exit for bad input.

Errors a person can fix (a bad file, an unknown store, wrong credentials) end a command with one line per problem
on stderr, ``error: <what>: <why>``, and exit status 2: no traceback. The lines never hold a secret.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import json
import os
import sys
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import typer
from typer.core import TyperCommand, TyperGroup, TyperOption

from xwin.schemas.render import RenderSpec

if TYPE_CHECKING:
    import asyncio

    from pydantic import ValidationError

    from xwin.storage import ProjectionDataset, Store

T = TypeVar("T")

StoreOpt = Annotated[str, typer.Option("--store", help="store URL: local path, file:// or s3://bucket/prefix")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]
SpecOpt = Annotated[
    Path | None, typer.Option("--spec", help="RenderSpec as a JSON or YAML file (default: X-WIN defaults)")
]
CohortOpt = Annotated[str | None, typer.Option("--cohort", help="dataset cohort (default: the volume's cohort)")]
SpecHashOpt = Annotated[
    str | None, typer.Option("--spec-hash", help="dataset spec hash or a unique prefix (instead of --spec)")
]


# ---- one-line errors -------------------------------------------------------------------------------------------
def fail(*lines: str) -> NoReturn:
    """Print each line as ``error: <line>`` on stderr (secrets masked) and end the command with exit status 2. Under
    torchrun every rank exits 2 and only rank 0 prints (each rank meets the same bad input)."""
    if os.environ.get("RANK", "0").strip() in ("", "0"):
        for line in lines:
            typer.echo(f"error: {mask_secrets(line)}", err=True)
    raise typer.Exit(2)


def mask_secrets(text: str) -> str:
    """``text`` with the values of secret-bearing environment variables replaced by ``***``."""
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        v = os.environ.get(var)
        if v and len(v) >= 4:
            text = text.replace(v, "***")
    return text


def _short(value: object, limit: int = 60) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def validation_lines(source: str, err: ValidationError, field_prefix: str = "") -> list[str]:
    """One line per problem pydantic found: ``<source>: <field> = <value>: <rule>``."""
    return [problem_line(source, e, field_prefix) for e in err.errors(include_url=False)]


def problem_line(source: str, e: Any, field_prefix: str = "") -> str:
    """One pydantic error (an item of ``ValidationError.errors()``) as ``<source>: <field> = <value>: <rule>``."""
    field = field_prefix + ".".join(str(p) for p in e["loc"])
    msg = str(e["msg"]).removeprefix("Value error, ")
    if e["type"] == "missing":
        return f"{source}: {field}: required field missing"
    if e["type"] == "extra_forbidden":
        return f"{source}: {field} = {_short(e.get('input'))}: unknown field"
    if not e["loc"]:
        return f"{source}: {msg}"
    return f"{source}: {field} = {_short(e.get('input'))}: {msg}"


def read_mapping(path: Path | str, what: str) -> dict:
    """The mapping in a .json / .yaml / .yml file (``what`` names it in errors: "spec", "config", ...).

    A missing file, a parse error (with its line and column) or a document that is not a mapping ends the command
    with one line naming the file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        fail(f"{what} file {p}: no such file")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        fail(f"{what} file {p}: cannot read it ({e})")
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            fail(f"{p}: line {e.lineno} column {e.colno}: not valid JSON ({e.msg})")
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            fail(f"{p}: {where}not valid YAML ({problem})")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        fail(f"{p}: the {what} must be a mapping of field: value, got a {type(data).__name__}")
    return data


def load_spec(path: Path | str | None) -> RenderSpec:
    """A RenderSpec from a .json/.yaml/.yml file, or the defaults when ``path`` is None. A bad file ends the
    command with one line per problem (file, field, value, rule) and exit status 2."""
    from pydantic import ValidationError

    if path is None:
        return RenderSpec()
    data = read_mapping(path, "spec")
    try:
        return RenderSpec.model_validate(data)
    except ValidationError as e:
        fail(*validation_lines(str(path), e))


def load_look(path: Path | str):
    """A radiograph look (xwin.schemas.look.Look) from a .json/.yaml/.yml file; a bad file ends the command with one
    line per problem (file, field, value, rule) and exit status 2."""
    from pydantic import ValidationError

    from xwin.schemas.look import Look

    data = read_mapping(path, "look")
    try:
        return Look.model_validate(data)
    except ValidationError as e:
        fail(*validation_lines(str(path), e))


def check_manifest(path: Path | str) -> None:
    """An NBIA metadata.csv given on the command line must exist and have the NBIA header, else exit 2 with one line
    (rows that do not validate are the run's to reject, each with its line number)."""
    import csv

    from xwin.pipeline.ingest import IngestError
    from xwin.pipeline.ingest.plan import read_manifest

    p = Path(path)
    if not p.is_file():
        fail(f"manifest {p}: no such file")
    try:
        read_manifest(p)
    except IngestError as e:
        fail(e.detail)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        fail(f"manifest {p}: cannot read it ({e})")


def check_cohort(cohort: str, option: str = "--cohort") -> str:
    """``cohort`` if it is a valid cohort name (it becomes a path segment of the store); else exit 2. Run it before
    anything is created in a store."""
    from xwin.storage.layout import check_id

    try:
        return check_id("cohort", cohort)
    except ValueError as e:
        fail(f"{option}: {e}")


def or_exit(
    fn: Callable[..., T],
    *args: object,
    errors: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError),
    **kw: object,
) -> T:
    """``fn(*args, **kw)``; a bad input (one of ``errors``) ends the command with its message and exit status 2."""
    try:
        return fn(*args, **kw)
    except errors as e:
        fail(*(str(e).splitlines() or [type(e).__name__]))


def check_sources(sources: Iterable[str], option: str = "--source") -> None:
    """Every source named on the command line (a NIfTI file, DICOM folder or metadata.csv; ``example``) must
    exist: a missing one is a typo to fix before anything is created, so the command ends with one line per
    missing source and exit status 2."""
    missing = [s for s in sources if s != "example" and "://" not in s and not Path(s).expanduser().exists()]
    if missing:
        fail(*(f"{option} {s}: no such file or directory" for s in missing))


def check_backend(name: str | None, *, here: bool = True, option: str = "--backend") -> str:
    """The render backend ``name`` (None: XWIN_RENDER_BACKEND, else ``auto``) resolved: an unknown name, or (with
    ``here``: the rings are rendered on this machine) one that cannot run here (triton without CUDA, a library
    that is not installed), ends the command with one line and exit status 2 before anything is created."""
    from xwin.pipeline.render import BACKENDS, resolve_backend

    given = name or os.environ.get("XWIN_RENDER_BACKEND") or "auto"
    where = option if name else ("XWIN_RENDER_BACKEND" if os.environ.get("XWIN_RENDER_BACKEND") else option)
    if given != "auto" and given not in BACKENDS:
        fail(f"{where} {given}: unknown render backend; known: {', '.join(['auto', *sorted(BACKENDS)])}")
    if not here:
        return given
    try:
        return resolve_backend(given)
    except (ValueError, RuntimeError) as e:
        fail(f"{where} {given}: {e}")


def check_output(path: Path, *, folder: bool, option: str = "--out") -> None:
    """``path`` must be writable as a file (``folder`` False) or a folder (True): an existing one of the other
    kind, a file where a folder above it must be, or a folder this user cannot write ends the command with one
    line and exit status 2, before the store is read or anything is created."""
    p = Path(path).expanduser()
    if p.exists():
        if folder and not p.is_dir():
            fail(f"{option} {path}: is a file, not a folder")
        if not folder and p.is_dir():
            fail(f"{option} {path}: is a folder: give the file to write")
        target = p if folder else p.parent
        if not os.access(target, os.W_OK | os.X_OK):
            fail(f"{option} {path}: permission denied: this user cannot write {target}")
        return
    _check_creatable(f"{option} {path}", p, str(path))


def check_store_target(url: str) -> None:
    """A store a command may create (``backfill``, ``ingest``, ``scan``) must be one it can reach and write: an S3
    store is probed (:func:`probe_s3`); a local one must be a folder (or not exist yet) under a folder this user
    can write. A new store's URL holds no ``#``: ``<store url>#<cohort>`` names a dataset of a store, and as a store
    URL it would make a folder or prefix of that name. Otherwise one line and exit status 2, before anything is
    created."""
    if "#" in url and (url.startswith("s3://") or not Path(url.removeprefix("file://")).expanduser().exists()):
        base, _, frag = url.partition("#")
        fail(
            f"store {url}: '#' names a dataset (<store url>#<cohort>), not a store to write: "
            f"give --store {base} --cohort {frag.split('/')[0] or 'NAME'}"
        )
    if url.startswith("s3://"):
        probe_s3(url)
        return
    if "://" in url and not url.startswith("file://"):
        return  # another fsspec scheme: its own errors say what is wrong
    p = Path(url.removeprefix("file://")).expanduser()
    if p.exists():
        if not p.is_dir():
            fail(f"store {url}: {p} is a file, not a folder")
        if not os.access(p, os.W_OK | os.X_OK):
            fail(f"store {url}: permission denied: this user cannot write {p}")
        return
    _check_creatable(f"store {url}", p, "folders")


def _check_creatable(label: str, p: Path, what: str) -> None:
    """``p`` does not exist: its nearest existing ancestor must be a folder this user can write, else one line
    (``label``: why) and exit status 2."""
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        fail(f"{label}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        fail(f"{label}: permission denied: this user cannot create {what} in {parent}")


# ---- stores ----------------------------------------------------------------------------------------------------
def _chain(exc: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    x: BaseException | None = exc
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        yield x
        x = x.__cause__ or x.__context__


def store_problem(url: str | None, exc: BaseException) -> str | None:
    """One line saying why the store at ``url`` cannot be used, when ``exc`` is an error of reaching or reading it
    (no such store or bucket, credentials refused, endpoint down); None for any other error."""
    where = f"store {url}" if url else "store"
    from botocore import exceptions as bx  # comes with s3fs (aiobotocore)

    for x in _chain(exc):
        if isinstance(x, bx.NoCredentialsError):
            return f"{where}: no S3 credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
        if isinstance(x, (bx.EndpointConnectionError, bx.ConnectTimeoutError)):
            u = urlsplit(str(getattr(x, "kwargs", {}).get("endpoint_url", "")))
            return f"{where}: cannot reach the S3 endpoint {u.scheme}://{u.netloc}" if u.netloc else f"{where}: {x}"
        if isinstance(x, bx.ClientError):
            err = x.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = str(x.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            message = str(err.get("Message", "")).strip()
            said = f" ({code}{': ' + message if message else ''})" if code else ""
            if code == "NoSuchBucket":
                bucket = err.get("BucketName") or (url or "").removeprefix("s3://").split("/", 1)[0]
                return f"{where}: no such bucket {bucket!r}"
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
                return f"{where}: the S3 server refused the credentials{said}"
            if code in ("AccessDenied", "AllAccessDisabled") or status == "403" or code == "403":
                return f"{where}: access denied{said or ' (HTTP 403)'}: check the credentials and the bucket policy"
            if code == "404" or status == "404":
                return f"{where}: not found (HTTP 404): check the bucket name and the endpoint"
            return f"{where}: the S3 server answered {code or status}{': ' + message if message else ''}"
    from xwin.storage import StorageError

    if isinstance(exc, StorageError):
        return f"{where}: {exc}" if url and url not in str(exc) else str(exc)
    if isinstance(exc, PermissionError) and url and ("://" not in url or url.startswith("file://")):
        root = Path(url.removeprefix("file://")).expanduser().resolve()
        name = getattr(exc, "filename", None)
        if name and Path(name).expanduser().resolve().is_relative_to(root):  # a file of the store itself
            return f"{where}: permission denied: {name}"
    return None


def probe_s3(url: str) -> None:
    """One quick request to the bucket of an ``s3://`` store (no retries, short timeouts): a store whose endpoint is
    down, whose bucket does not exist or whose credentials are refused ends the command with one line."""
    if not url.startswith("s3://"):
        return
    import botocore.session
    from botocore.config import Config

    from xwin.storage import s3_options

    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    if not bucket:
        fail(f"store {url}: the URL names no bucket (s3://bucket/prefix)")
    client_kwargs = dict(s3_options().get("client_kwargs") or {})  # the endpoint the store will use
    config = Config(connect_timeout=5, read_timeout=15, retries={"max_attempts": 1})
    try:
        client = botocore.session.get_session().create_client("s3", config=config, **client_kwargs)
        client.list_objects_v2(Bucket=bucket, Prefix=prefix.rstrip("/"), MaxKeys=1)
    except Exception as e:  # noqa: BLE001 - classified; anything else is left to the store's own (retried) requests
        line = store_problem(url, e)
        if line is not None:
            fail(line)


def open_store_cli(url: str, *, create: bool = False) -> Store:
    """The store at ``url`` for a command: an S3 store is probed first (:func:`probe_s3`); a store that does not
    exist (``create=False``) or cannot be read ends the command with one line and exit status 2."""
    from xwin.storage import open_store

    probe_s3(url)
    try:
        return open_store(url, create=create)
    except FileNotFoundError as e:
        fail(str(e) if url in str(e) else f"store {url}: {e}")
    except Exception as e:  # classified: errors of reaching the store become one line, the rest propagate
        line = store_problem(url, e)
        if line is None:
            raise
        fail(line)


# ---- datasets: one way to name one --------------------------------------------------------------------------
DatasetStoreOpt = Annotated[
    str,
    typer.Option(
        "--store", help="store URL (local path or s3://bucket/prefix), or the dataset: <store url>#<cohort>[/<hash>]"
    ),
]


def dataset_options(
    store: str, cohort: str | None = None, spec_hash: str | None = None
) -> tuple[str, str | None, str | None]:
    """(store url, cohort, spec hash) from ``--store`` in either form -- a store URL, or the whole dataset
    ``<store url>#<cohort>[/<spec hash>]`` -- and ``--cohort`` / ``--spec-hash``; a fragment that contradicts an
    option, or an invalid cohort, ends the command with one line and exit status 2."""
    from xwin.storage.layout import split_dataset_url

    try:
        url, f_cohort, f_hash = split_dataset_url(store)
    except ValueError as e:
        fail(f"--store {store}: {e}")
    for option, given, frag in (("--cohort", cohort, f_cohort), ("--spec-hash", spec_hash, f_hash)):
        if given is not None and frag is not None and given != frag:
            fail(f"--store {store} names {frag!r} but {option} is {given!r}: give one of them")
    cohort = cohort or f_cohort
    if cohort is not None:
        check_cohort(cohort)
    return url, cohort, spec_hash or f_hash


def resolve_dataset(
    store: str, cohort: str | None = None, spec_hash: str | None = None
) -> tuple[Store, ProjectionDataset, str]:
    """The one projection dataset a command reads: (store, dataset, its dataset URL ``<store url>#<cohort>/<spec
    hash>`` in full). ``--store`` is a store URL or the whole dataset URL (:func:`dataset_options`); ``--cohort``
    and ``--spec-hash`` (a unique prefix is enough) narrow it down, and are needed only when the store holds
    several datasets. None or several: one line naming the datasets the store holds, exit status 2."""
    from xwin.storage import DatasetLookupError

    url, cohort, spec_hash = dataset_options(store, cohort, spec_hash)
    st = open_store_cli(url)
    try:
        ds = st.find_dataset(cohort, spec_hash)
    except DatasetLookupError as e:
        fail(f"{e}; name one with --cohort/--spec-hash or --store <store url>#<cohort>/<spec hash>")
    return st, ds, f"{url}#{ds.cohort}/{ds.spec_hash}"


def resolve_volumes(ds: ProjectionDataset, given: Iterable[str], option: str = "--volumes") -> list[str]:
    """Volume ids of the rings of ``ds``, each given whole or as a unique prefix (as ``describe`` takes them);
    one that matches no ring, or several, ends the command with one line naming the dataset and the candidates."""
    have = sorted(ds.volume_ids())
    out: list[str] = []
    lines: list[str] = []
    for v in given:
        hits = [v] if v in have else [h for h in have if h.startswith(v)]
        if len(hits) == 1:
            out.append(hits[0])
        elif not hits:
            some = ", ".join(h[:12] for h in have[:5]) + (", ..." if len(have) > 5 else "")
            lines.append(
                f"{option} {v}: no ring of dataset {ds.cohort}/{ds.spec_hash} has this id or prefix "
                f"({len(have)} rings{': ' + some if have else ''})"
            )
        else:
            lines.append(f"{option} {v}: ambiguous in dataset {ds.cohort}/{ds.spec_hash} ({', '.join(hits[:5])})")
    if lines:
        fail(*lines)
    return out


def check_split(st: Store, ds: ProjectionDataset, split: str | None, option: str = "--split") -> None:
    """``split`` of the dataset's cohort must exist and hold at least one ring of ``ds``; else one line naming the
    split, the cohort and the splits it has (with their ring counts), exit status 2."""
    if split is None:
        return
    doc = st.read_splits(ds.cohort)
    if doc is None:
        fail(
            f"{option} {split}: cohort {ds.cohort!r} has no split assignment in {st.url}: run "
            f"`xwin splits assign --store {st.url} --cohort {ds.cohort}`"
        )
    rings = set(ds.volume_ids())
    names = [*doc.policy.fractions, "excluded"]
    counts = ", ".join(f"{n} {len(doc.volumes_in(n) & rings)}" for n in names)
    if split not in names:
        fail(f"{option} {split}: cohort {ds.cohort!r} has no split {split!r}; rings per split: {counts}")
    if not doc.volumes_in(split) & rings:
        fail(
            f"{option} {split}: split {split!r} of cohort {ds.cohort!r} holds no volume with a ring in dataset "
            f"{ds.cohort}/{ds.spec_hash}; rings per split: {counts}"
        )


def close_s3_sessions() -> None:
    """Close the aiohttp sessions of the asynchronous S3 filesystems zarr used in this process, so that none is left
    for the interpreter's exit to report ("Unclosed client session")."""
    s3fs = sys.modules.get("s3fs")
    if s3fs is None:
        return
    import asyncio

    from zarr.core.sync import _get_loop

    for fs in list(s3fs.S3FileSystem._cache.values()):
        creator = getattr(fs, "_s3creator", None)
        if not getattr(fs, "asynchronous", False) or creator is None:
            continue  # synchronous filesystems close their own sessions when collected
        loop = _session_loop(fs) or _get_loop()  # the loop the session was opened on (zarr's)
        if loop.is_running() and not loop.is_closed():
            close = creator.clear() if hasattr(creator, "clear") else creator.__aexit__(None, None, None)
            with contextlib.suppress(Exception):  # closing is best effort at the end of a command
                asyncio.run_coroutine_threadsafe(close, loop).result(timeout=10)
        fs._s3 = None
        fs._s3creator = None


def _session_loop(fs: Any) -> asyncio.AbstractEventLoop | None:
    """The event loop of the aiohttp session under an s3fs filesystem (aiobotocore internals; None if unknown)."""
    try:
        for session in fs._s3._endpoint.http_session._sessions.values():
            return session._loop
    except AttributeError:
        pass
    return None


# at exit (after the command's own atexit work): the interpreter's last garbage collection over every object a run
# made takes seconds after a backfill and would only delay the exit, after a Ctrl-C too
atexit.register(gc.freeze)


def cli_errors(fn: Callable[..., None]) -> Callable[..., None]:
    """Wrap a command: an error of reaching its store (``--store``) becomes one line and exit status 2, Ctrl-C or
    SIGTERM one line and exit status 130 / 143 (``xwin.flows.stop``), and the S3 sessions the command opened are
    closed before it returns."""

    @functools.wraps(fn)
    def run(*args: Any, **kw: Any) -> None:
        from xwin.flows import stop

        try:
            with stop.interrupt_on_signal():  # Ctrl-C / SIGTERM: commands with stop points install their own
                fn(*args, **kw)
        except stop.Cancelled:
            typer.echo("cancelled: stopped before it finished; run the same command again to continue", err=True)
            raise typer.Exit(stop.exit_code()) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:  # classified: store errors become one line, everything else propagates
            store = kw.get("store")
            line = store_problem(store if isinstance(store, str) else None, e)
            if line is None:
                raise
            fail(line)
        finally:
            close_s3_sessions()

    return run


# ---- Prefect ---------------------------------------------------------------------------------------------------
def configured_prefect_api() -> str | None:
    """The Prefect API URL configured for this process (PREFECT_API_URL in the environment, else in the active
    profile), read without importing Prefect: the import itself is what shows Prefect's telemetry notice."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    name = os.environ.get("PREFECT_PROFILE") or data.get("active") or "ephemeral"
    return (data.get("profiles", {}).get(name) or {}).get("PREFECT_API_URL") or None


def prefect_server_configured() -> bool:
    """Whether a Prefect API is configured (:func:`configured_prefect_api`)."""
    return configured_prefect_api() is not None


def require_prefect_server(command: str, hint: str = "") -> str:
    """The URL of a Prefect server that answers (``GET <PREFECT_API_URL>/health``), for commands that register
    something with one (``xwin deploy``); without one the command ends with one line saying what to set: Prefect
    would otherwise write into a throw-away local database that no worker ever reads. ``hint`` ends the line of a
    server that does not answer (another way to run the command)."""
    import urllib.error
    import urllib.request

    url = configured_prefect_api()
    if url is None:
        fail(
            f"{command} needs a Prefect server: set PREFECT_API_URL to its API (e.g. http://127.0.0.1:4200/api after "
            '`prefect server start`; docs/orchestration.md, "Your own servers")'
        )
    if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
        fail(f"PREFECT_API_URL {url}: not an http(s) URL of a Prefect API (e.g. http://127.0.0.1:4200/api)")
    req = urllib.request.Request(url.rstrip("/") + "/health")
    if os.environ.get("PREFECT_API_KEY"):
        req.add_header("Authorization", f"Bearer {os.environ['PREFECT_API_KEY']}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:  # the user's own server URL
            r.read()
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            fail(f"PREFECT_API_URL {url}: the server refused the credentials (HTTP {e.code}): check PREFECT_API_KEY")
        fail(f"PREFECT_API_URL {url}: no Prefect API there (HTTP {e.code} on /health): check the URL (it ends in /api)")
    except (urllib.error.URLError, OSError, ValueError) as e:
        why = getattr(e, "reason", None) or e
        fail(
            f"PREFECT_API_URL {url}: no Prefect server answers ({why}): start one (`prefect server start`) or fix "
            f"PREFECT_API_URL{hint}"
        )
    return url


def quiet_prefect(verbose: bool, server: bool = True) -> None:
    """Prefect reads its settings at import: set quiet defaults before the first import (the user's env wins).

    ``server=False`` (the serverless path: no Prefect API is involved) also sets DO_NOT_TRACK=1, so importing
    Prefect shows no telemetry notice and sends nothing. On server paths Prefect's own telemetry settings apply
    (opt out with DO_NOT_TRACK=1 on clients, PREFECT_SERVER_ANALYTICS_ENABLED=false on the server)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # ephemeral server: no telemetry calls
    if not server:
        os.environ.setdefault("DO_NOT_TRACK", "1")
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")


# ---- help ------------------------------------------------------------------------------------------------------
def short_metavars(cmd: Any) -> None:
    """Value types of ``cmd``'s options (and of its subcommands', for a group) as short words: TEXT, PATH, INT;
    none for flags. Typer's own ``<list[str]>``-style column squeezes the help text at 80 columns."""
    ctx = typer.Context(cmd)
    for p in cmd.params:
        if isinstance(p, TyperOption) and p.metavar is None:
            p.metavar = "" if p.is_flag else _type_word(p, ctx)
    for sub in (getattr(cmd, "commands", None) or {}).values():
        short_metavars(sub)


class XwinCommand(TyperCommand):
    """A command whose help reads at 80 columns (:func:`short_metavars`)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        short_metavars(self)


class XwinGroup(TyperGroup):
    """The ``xwin`` group: every command under it, nested groups included, gets :func:`short_metavars`; the list
    of commands shows each one's first sentence whole, wrapped (click cuts it with "..." at 45 characters)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        short_metavars(self)

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit=10_000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}  # every command and group: -h is --help


def _type_word(p: TyperOption, ctx: Any) -> str:
    label = p.display_type(ctx).strip("<>")
    label = label.removeprefix("list[").removesuffix("]").replace(" range", "")
    return {"str": "TEXT"}.get(label, label.upper())
