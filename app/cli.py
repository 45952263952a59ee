"""The `distill` command line.

Two kinds of commands live here:

* running the service on this machine: `up` (database, key, API and worker together), `api`, `worker`,
  `migrate`, `keys create`; these read the same Settings as the service (DATABASE_URL, QUEUE, ...);
* driving a running service through the SDK (`app.client`): `files`, `jobs`, `demo`. They talk to
  DISTILL_URL (default http://127.0.0.1:8000) with DISTILL_API_KEY, or with the key `distill up` wrote
  to var/local-api-key when that variable is unset.

The parent process never imports torch: GPUs are counted with `nvidia-smi -L`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)  # fmt: skip
from rich.table import Table
from typer.core import TyperGroup

from app.client import DEFAULT_URL, DistillAPIError, DistillClient, DistillIntegrityError
from app.settings import get_settings

# Piped output is not wrapped at rich's 80-column fallback: tables stay one row per line.
_PIPE_WIDTH = None if sys.stdout.isatty() else max(int(os.environ.get("COLUMNS") or 0), 160)
out = Console(highlight=False, width=_PIPE_WIDTH)
err = Console(stderr=True, highlight=False, soft_wrap=True)

LOCAL_KEY_FILE = "local-api-key"
CELERY_APP = "worker.celery_app:celery_app"
GPU_QUEUE = "gpu"

# Tests swap in an httpx.MockTransport here; None means real HTTP.
_transport: httpx.BaseTransport | None = None


class _Group(TyperGroup):
    """Turns SDK and connection errors into one readable line on stderr and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DistillAPIError as e:
            err.print(f"[bold red]error:[/] {escape(str(e))}")
            raise typer.Exit(1) from None
        except DistillIntegrityError as e:
            err.print(f"[bold red]integrity error:[/] {escape(str(e))}")
            raise typer.Exit(1) from None
        except httpx.TransportError as e:
            url = getattr(ctx.obj, "url", DEFAULT_URL)
            err.print(f"[bold red]error:[/] cannot reach the service at {escape(url)}: {escape(str(e) or type(e).__name__)}"
                      "\n[dim]Start it with `distill up`, or point DISTILL_URL at it.[/]")  # fmt: skip
            raise typer.Exit(1) from None
        except TimeoutError as e:
            err.print(f"[bold red]timeout:[/] {escape(str(e))}")
            raise typer.Exit(1) from None


app = typer.Typer(cls=_Group, no_args_is_help=True, add_completion=False,
                  help="Knowledge distillation as a service: run it locally and drive it from the shell.")  # fmt: skip
keys_app = typer.Typer(no_args_is_help=True, help="API keys (written straight to the configured database).")
files_app = typer.Typer(no_args_is_help=True, help="Upload and manage teacher weights and datasets.")
jobs_app = typer.Typer(no_args_is_help=True, help="Create, watch, cancel and download distillation jobs.")
app.add_typer(keys_app, name="keys")
app.add_typer(files_app, name="files")
app.add_typer(jobs_app, name="jobs")
webhooks_app = typer.Typer(no_args_is_help=True, help="Webhooks: the secret that signs job-finished deliveries.")
app.add_typer(webhooks_app, name="webhooks")


# ---- connection state -----------------------------------------------------------------------------


@dataclass
class State:
    url: str = DEFAULT_URL
    api_key: str | None = None

    def resolved_key(self) -> str | None:
        if self.api_key:
            return self.api_key
        path = local_key_path()
        if path.is_file():
            return path.read_text().strip() or None
        return None

    def client(self) -> DistillClient:
        return DistillClient(self.url, api_key=self.resolved_key() or "", transport=_transport)


def local_key_path() -> Path:
    return get_settings().data_dir / LOCAL_KEY_FILE


def _state(ctx: typer.Context) -> State:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, State) else State()


@app.callback()
def _root(
    ctx: typer.Context,
    url: Annotated[str, typer.Option("--url", envvar="DISTILL_URL", help="Service base URL.")] = DEFAULT_URL,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="DISTILL_API_KEY",
            show_default=False,
            help="API key (default: var/local-api-key when it exists).",
        ),
    ] = None,
) -> None:
    ctx.obj = State(url=url.rstrip("/"), api_key=api_key)


JsonOpt = Annotated[bool, typer.Option("--json", help="Print the raw JSON answer.")]


# ---- formatting -----------------------------------------------------------------------------------


def _print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


def _human_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _ts(value: str | None) -> str:
    return "–" if not value else value.replace("T", " ")[:19]


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}%"


def _int(v: Any) -> str:
    return "–" if v is None else f"{int(v):,}"


def _times(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}×"


def _arch(arch: dict | None) -> str:
    if not arch:
        return "–"
    cfg = ", ".join(f"{k}={v}" for k, v in (arch.get("config") or {}).items())
    return f"{arch.get('name')}({cfg})" if cfg else str(arch.get("name"))


def _progress_text(job: dict) -> str:
    p = job.get("progress") or {}
    if job.get("status") == "succeeded":
        return "100%"
    if p.get("epochs"):
        return f"{p.get('epoch', 0)}/{p['epochs']} ({100 * (p.get('fraction') or 0):.0f}%)"
    return "–"


def _status(status: str) -> str:
    colour = {"succeeded": "green", "failed": "red", "cancelled": "yellow", "running": "cyan"}.get(
        status, "white"
    )
    return f"[{colour}]{status}[/]"


def _jobs_table(jobs: list[dict]) -> Table:
    table = Table(show_edge=False, header_style="bold")
    for col in ("id", "name", "status", "method", "progress", "val acc", "created"):
        table.add_column(col, no_wrap=col in ("id", "status"))
    for j in jobs:
        metrics = j.get("metrics") or {}
        table.add_row(j["id"], escape(j.get("name") or ""), _status(j["status"]),
                      ((j.get("spec") or {}).get("method") or {}).get("type", "–"), _progress_text(j),
                      _pct(metrics.get("val_accuracy")), _ts(j.get("created_at")))  # fmt: skip
    return table


def _job_table(job: dict) -> Table:
    spec = job.get("spec") or {}
    method = dict(spec.get("method") or {})
    teachers = [t.get("from_job") or f"{_arch(t.get('architecture'))} ← {t.get('weights_file')}"
                for t in spec.get("teachers") or []]  # fmt: skip
    table = Table(show_header=False, show_edge=False, box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("id", job["id"]), ("name", escape(job.get("name") or "–")), ("status", _status(job["status"])),
        ("method", escape(json.dumps(method))), ("teachers", escape(", ".join(teachers) or "–")),
        ("student", escape(_arch((spec.get("student") or {}).get("architecture")))),
        ("train_file", escape(str(spec.get("train_file")))), ("progress", _progress_text(job)),
        ("attempts", str(job.get("attempts", 0))), ("created", _ts(job.get("created_at"))),
        ("started", _ts(job.get("started_at"))), ("finished", _ts(job.get("finished_at"))),
    ]  # fmt: skip
    if job.get("error"):
        e = job["error"]
        rows.append(("error", f"[red]{escape(e.get('code', ''))}[/]: {escape(e.get('message', ''))}"
                              + (f" (param {escape(e['param'])})" if e.get("param") else "")))  # fmt: skip
    for k, v in (job.get("metrics") or {}).items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            rows.append((f"metrics.{k}", escape(f"{v:.4g}" if isinstance(v, float) else str(v))))
    for k, v in rows:
        table.add_row(k, v)
    return table


def _files_table(files: list[dict]) -> Table:
    table = Table(show_edge=False, header_style="bold")
    for col in ("id", "purpose", "filename", "size", "format", "sha256", "created"):
        table.add_column(col, no_wrap=col in ("id", "sha256"))
    for f in files:
        table.add_row(f["id"], f["purpose"], escape(f["filename"]), _human_bytes(f.get("bytes")),
                      f.get("format", "–"), (f.get("sha256") or "")[:12], _ts(f.get("created_at")))  # fmt: skip
    return table


def _byte_progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=err, transient=True)  # fmt: skip


def _job_progress() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=err)  # fmt: skip


def _watch(client: DistillClient, job_id: str, progress: Progress, *, label: str | None = None,
           poll_s: float = 1.0, timeout_s: float | None = None, stream: bool = True) -> dict:  # fmt: skip
    """Wait for a job with a progress bar driven by progress.fraction and the epoch counter; with `stream`, follow
    its events (printing each message above the bar, the latest validation accuracy beside it) as they arrive."""
    task = progress.add_task(label or job_id, total=1.0, info="queued")
    latest: dict[str, str] = {}

    def update(job: dict) -> None:
        p = job.get("progress") or {}
        info = job["status"]
        if p.get("epochs"):
            info += f" · epoch {p.get('epoch', 0)}/{p['epochs']}"
        if p.get("phase"):
            info += f" · {p['phase']}"
        if latest.get("val") and job["status"] == "running":
            info += f" · {latest['val']}"
        done = 1.0 if job["status"] == "succeeded" else float(p.get("fraction") or 0.0)
        progress.update(task, completed=min(max(done, 0.0), 1.0), info=info)

    def show(event: dict) -> None:
        data = event.get("data") or {}
        if event["type"] == "metrics":
            if data.get("val_accuracy") is not None:
                latest["val"] = f"{data.get('phase', 'train')} val {_pct(data['val_accuracy'])}"
            return
        if event["type"] == "message":
            level = event.get("level", "info")
            colour = {"error": "red", "warning": "yellow"}.get(level, "dim")
            stamp = _ts(event.get("created_at"))
            progress.console.print(f"[{colour}]{stamp}[/] {escape(event.get('message', ''))}")

    def fallback(reason: str) -> None:
        progress.console.print(
            f"[yellow]events stream unavailable ({escape(reason)}); polling every {poll_s:g} s[/]"
        )

    return client.jobs.wait(job_id, poll_s=poll_s, timeout_s=timeout_s, on_progress=update, on_event=show,
                            stream=stream, on_fallback=fallback)  # fmt: skip


def _report_outcome(job: dict) -> int:
    """Print a finished job's outcome; 0 when it succeeded."""
    if job["status"] == "succeeded":
        metrics = job.get("metrics") or {}
        acc = metrics.get("val_accuracy")
        err.print(
            f"[green]✓[/] {job['id']} succeeded" + (f" · val accuracy {_pct(acc)}" if acc is not None else "")
        )
        return 0
    if job["status"] == "failed":
        e = job.get("error") or {}
        err.print(f"[red]✗[/] {job['id']} failed: [bold]{escape(e.get('code') or 'error')}[/]: "
                  f"{escape(e.get('message') or 'no message')}" + (f" (param {escape(e['param'])})" if e.get("param") else ""))  # fmt: skip
        return 1
    err.print(f"[yellow]■[/] {job['id']} {job['status']}")
    return 1


def _load_spec(path: str) -> dict:
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    suffix = "" if path == "-" else Path(path).suffix.lower()
    try:
        if suffix == ".json":
            spec = json.loads(text)
        else:  # YAML is a superset of JSON: .yaml, .yml, stdin and anything else
            spec = yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise typer.BadParameter(f"{path}: not valid JSON/YAML: {e}", param_hint="-f") from None
    if not isinstance(spec, dict):
        raise typer.BadParameter(f"{path}: the spec must be a mapping (a JSON object)", param_hint="-f")
    return spec


def _mask_url(url: str) -> str:
    """Hide the password in a database URL before printing it."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        creds, _, host = rest.rpartition("@")
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else url
    return url


# ---- process supervision --------------------------------------------------------------------------


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGTERM the child if this parent dies without cleaning up (kill -9)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with suppress(OSError, AttributeError):  # no glibc: children just lack the safety net
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Supervisor:
    """Runs child processes; stops them all on a signal, or when any one of them exits.

    Children get their own session, so a terminal's Ctrl-C reaches only this parent, which then stops them in
    order: SIGTERM, up to `grace_s` to exit, then SIGKILL.
    """

    def __init__(self, grace_s: float = 10.0):
        self.grace_s = grace_s
        self.children: dict[str, subprocess.Popen] = {}
        self.signalled: int | None = None
        self._stop = threading.Event()

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        # preexec_fn is safe here: the CLI starts its children before it starts any thread.
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)  # noqa: PLW1509
        self.children[name] = proc
        return proc

    def request_stop(self, signum: int | None = None, _frame=None) -> None:
        self.signalled = signum
        self._stop.set()

    @contextmanager
    def signals(self) -> Iterator[None]:
        """Route SIGINT, SIGTERM and SIGHUP to request_stop while the block runs."""
        wanted = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
        previous = {s: signal.signal(s, self.request_stop) for s in wanted}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def exited(self) -> tuple[str, int] | None:
        for name, proc in self.children.items():
            code = proc.poll()
            if code is not None:
                return name, code
        return None

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def wait(self, poll_s: float = 0.5) -> int:
        """Block until a signal (exit status 0) or a child's exit (its status, at least 1); stop the rest."""
        while not self._stop.wait(poll_s):
            dead = self.exited()
            if dead is not None:
                name, code = dead
                err.print(f"[red]{name} exited with status {code}; stopping the rest[/]")
                self.stop()
                return code if code > 0 else 1
        err.print("[dim]stopping…[/]")
        self.stop()
        return 0

    def stop(self) -> None:
        alive = [p for p in self.children.values() if p.poll() is None]
        for proc in alive:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + self.grace_s
        for proc in alive:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def worker_command(queue: str, node_name: str, loglevel: str = "INFO") -> list[str]:
    """One Celery worker process: solo pool, one job at a time, consuming `queue`."""
    return [sys.executable, "-m", "celery", "-A", CELERY_APP, "worker", "-P", "solo", "-c", "1", "-Q", queue,
            "--loglevel", loglevel, "-n", node_name, "--without-gossip", "--without-mingle",
            "--without-heartbeat"]  # fmt: skip


def api_command(host: str, port: int, workers: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", host, "--port", str(port)]
    if workers and workers > 1:
        cmd += ["--workers", str(workers)]
    return cmd


def count_gpus() -> int:
    """NVIDIA GPUs visible here, from `nvidia-smi -L` (or the driver's /proc entries); 0 when none."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            listing = subprocess.run(
                [smi, "-L"], capture_output=True, text=True, timeout=20, check=True
            ).stdout
            return sum(1 for line in listing.splitlines() if line.startswith("GPU "))
        except (subprocess.SubprocessError, OSError):
            pass
    proc_dir = Path("/proc/driver/nvidia/gpus")
    return len(list(proc_dir.iterdir())) if proc_dir.is_dir() else 0


def resolve_gpus(gpus: str) -> list[str]:
    """`none` → [], `all` → every visible GPU (respecting CUDA_VISIBLE_DEVICES), `0,1` → those ids."""
    value = gpus.strip().lower()
    if value in ("", "none", "cpu"):
        return []
    if value == "all":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
        if visible and visible != "-1":
            return [d.strip() for d in visible.split(",") if d.strip()]
        return [str(i) for i in range(count_gpus())]
    ids = [d.strip() for d in gpus.split(",")]
    if not all(ids) or any(" " in d for d in ids):
        raise typer.BadParameter(f"expected all, none or a comma-separated list of GPU ids, got {gpus!r}",
                                 param_hint="--gpus")  # fmt: skip
    return ids


def ensure_local_key(data_dir: Path) -> tuple[str, bool]:
    """The local tenant's key from data_dir/local-api-key, created (mode 0600) on first use.

    A key file left over from a deleted database is replaced, so the printed key always works.
    """
    from app.auth import create_api_key, tenant_for_key
    from app.db import session_scope

    path = data_dir / LOCAL_KEY_FILE
    with session_scope() as session:
        if path.is_file():
            key = path.read_text().strip()
            if key and tenant_for_key(session, key=key) is not None:
                return key, False
        key = create_api_key(session, tenant_name="local")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    os.replace(tmp, path)
    return key, True


def _wait_healthy(url: str, sup: Supervisor, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    with DistillClient(url, api_key="", timeout=2, transport=_transport) as client:
        while time.monotonic() < deadline and not sup.stopping:
            if sup.exited() is not None:
                return False
            try:
                if client.health().get("status") == "ok":
                    return True
            except (httpx.HTTPError, DistillAPIError, ValueError):
                pass
            time.sleep(0.25)
    return False


# ---- running the service --------------------------------------------------------------------------


@app.command()
def up(
    host: Annotated[str, typer.Option(help="API bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="API port.")] = 8000,
    grace: Annotated[float, typer.Option(help="Seconds children get to stop before SIGKILL.")] = 10.0,
    startup_timeout: Annotated[float, typer.Option(help="Seconds to wait for /healthz.")] = 60.0,
) -> None:
    """Run everything locally: migrate the database, make a local API key, start the API and one worker."""
    from app.db import upgrade_head

    settings = get_settings()
    err.print(f"database {escape(_mask_url(settings.sqlalchemy_url))}: migrating to head")
    upgrade_head()
    key, created = ensure_local_key(settings.data_dir)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"

    sup = Supervisor(grace_s=grace)
    with sup.signals():
        sup.start("api", api_command(host, port))
        sup.start("worker", worker_command(settings.queue, f"local-{settings.queue}@%h"))
        if not _wait_healthy(url, sup, startup_timeout):
            if sup.stopping:
                sup.stop()
                raise typer.Exit(0)
            dead = sup.exited()
            why = (f"{dead[0]} exited with status {dead[1]}" if dead
                   else f"no answer from {url}/healthz within {startup_timeout:.0f} s")  # fmt: skip
            err.print(f"[red]the service did not start: {escape(why)}[/]")
            sup.stop()
            raise typer.Exit(1)
        out.print(f"[bold green]distill is up[/] at {url}  (queue {settings.queue!r}, data in {settings.data_dir})",
                  soft_wrap=True)  # fmt: skip
        out.print(
            f"API key ({'new' if created else 'from'} {local_key_path()}): [bold]{key}[/]", soft_wrap=True
        )
        out.print(f"[dim]export DISTILL_URL={url} DISTILL_API_KEY={key}[/]", soft_wrap=True)
        out.print("[dim]Ctrl-C stops both processes[/]")
        code = sup.wait()
    raise typer.Exit(code)


@app.command()
def api(
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    workers: Annotated[
        int | None,
        typer.Option(
            min=0, show_default="settings.api_workers; 0 = CPU count", help="Uvicorn worker processes."
        ),
    ] = None,
) -> None:
    """Run the API server (uvicorn) in this process."""
    n = get_settings().api_workers if workers is None else workers
    n = n or (os.cpu_count() or 1)
    cmd = api_command(host, port, n)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)  # uvicorn becomes this process: signals reach it directly


@app.command()
def worker(
    gpus: Annotated[
        str, typer.Option(help="all, none, or GPU ids like 0,1: one worker process per GPU.")
    ] = "none",
    grace: Annotated[float, typer.Option(help="Seconds workers get to stop before SIGKILL.")] = 30.0,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
) -> None:
    """Run Celery workers: one per GPU (CUDA_VISIBLE_DEVICES pinned, queue `gpu`), or one on the CPU."""
    settings = get_settings()
    devices = resolve_gpus(gpus)
    if gpus.strip().lower() == "all" and not devices:
        err.print("[yellow]no NVIDIA GPU found; running one CPU worker[/]")
    sup = Supervisor(grace_s=grace)
    with sup.signals():
        if not devices:
            err.print(f"starting a CPU worker on queue {settings.queue!r}")
            sup.start("worker", worker_command(settings.queue, f"{settings.queue}@%h", loglevel))
        else:
            if settings.queue != GPU_QUEUE:
                err.print(f"[yellow]QUEUE is {settings.queue!r} here; GPU workers consume {GPU_QUEUE!r}, so the API "
                          f"must run with QUEUE={GPU_QUEUE} to reach them[/]")  # fmt: skip
            for dev in devices:
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": dev, "QUEUE": GPU_QUEUE}
                err.print(f"starting a worker on GPU {dev} (queue {GPU_QUEUE!r})")
                sup.start(f"worker-gpu{dev}", worker_command(GPU_QUEUE, f"gpu{dev}@%h", loglevel), env)
        code = sup.wait()
    raise typer.Exit(code)


@app.command()
def migrate() -> None:
    """Bring the database schema to the latest revision (Alembic upgrade head)."""
    from app.db import upgrade_head

    url = get_settings().sqlalchemy_url
    upgrade_head()
    err.print(f"[green]✓[/] database {escape(_mask_url(url))} is at head")


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant name (created if new).")],
) -> None:
    """Create an API key for a tenant and print it (shown only this once)."""
    from app.auth import create_api_key
    from app.db import session_scope

    if not tenant.strip():
        raise typer.BadParameter("must not be empty", param_hint="--tenant")
    with session_scope() as session:
        key = create_api_key(session, tenant_name=tenant.strip())
    typer.echo(key)
    err.print(f"[dim]key for tenant {escape(tenant.strip())!r}; store it now, it cannot be shown again[/]")


@keys_app.command("list")
def keys_list(
    tenant: Annotated[str | None, typer.Option("--tenant", help="Only this tenant's keys.")] = None,
) -> None:
    """List API keys (id, tenant, prefix, created, revoked); secrets are never stored, so never shown."""
    from rich.table import Table

    from app import repositories as repo
    from app.db import session_scope

    table = Table("id", "tenant", "prefix", "created", "revoked")
    with session_scope() as session:
        for key, tenant_name in repo.list_api_keys(session, tenant_name=tenant):
            table.add_row(key.id, tenant_name, key.prefix + "…", key.created_at.isoformat(timespec="seconds"),
                          key.revoked_at.isoformat(timespec="seconds") if key.revoked_at else "")  # fmt: skip
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key's id (from `distill keys list`).")]) -> None:
    """Revoke an API key: requests with it answer 401 from now on."""
    from app.auth import revoke_api_key
    from app.db import session_scope

    with session_scope() as session:
        revoked = revoke_api_key(session, key_id=key_id)
    if not revoked:
        err.print(f"[red]no active key with id {escape(key_id)!r}[/]")
        raise typer.Exit(1)
    err.print(f"[green]✓[/] revoked {escape(key_id)}")


# ---- files ----------------------------------------------------------------------------------------


@files_app.command("upload")
def files_upload(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="File to upload.")],
    purpose: Annotated[str, typer.Option(help="teacher (safetensors) or dataset (npz/safetensors).")],
    json_out: JsonOpt = False,
) -> None:
    """Upload teacher weights or a dataset (streamed from disk, validated by the service)."""
    if purpose not in ("teacher", "dataset"):
        raise typer.BadParameter("must be teacher or dataset", param_hint="--purpose")
    with _state(ctx).client() as client, _byte_progress() as progress:
        task = progress.add_task(f"upload {path.name}", total=path.stat().st_size)
        f = client.files.upload(
            path, purpose, on_progress=lambda done, total: progress.update(task, completed=done)
        )
    if json_out:
        _print_json(f)
    else:
        out.print(_files_table([f]))


@files_app.command("list")
def files_list(
    ctx: typer.Context,
    purpose: Annotated[str | None, typer.Option(help="Only teacher or dataset files.")] = None,
    limit: Annotated[int, typer.Option(min=0, help="At most this many (0 = all).")] = 20,
    json_out: JsonOpt = False,
) -> None:
    """List your files, newest first."""
    with _state(ctx).client() as client:
        files = client.files.list(purpose=purpose, limit=limit or None)
    if json_out:
        _print_json({"object": "list", "data": files})
    elif not files:
        err.print("no files")
    else:
        out.print(_files_table(files))


@files_app.command("get")
def files_get(ctx: typer.Context, file_id: str, json_out: JsonOpt = False) -> None:
    """Show one file."""
    with _state(ctx).client() as client:
        f = client.files.get(file_id)
    if json_out:
        _print_json(f)
    else:
        out.print(_files_table([f]))


@files_app.command("delete")
def files_delete(ctx: typer.Context, file_id: str) -> None:
    """Delete a file."""
    with _state(ctx).client() as client:
        client.files.delete(file_id)
    err.print(f"[green]✓[/] deleted {file_id}")


# ---- webhooks -------------------------------------------------------------------------------------


@webhooks_app.command("secret")
def webhooks_secret(
    ctx: typer.Context,
    rotate: Annotated[
        bool, typer.Option("--rotate", help="Replace the secret; the old one keeps signing for a grace period.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Create your webhook signing secret (or --rotate it) and print it: it is shown this once."""
    with _state(ctx).client() as client:
        if rotate:
            row = client.webhooks.rotate_secret()
        else:
            try:
                row = client.webhooks.create_secret()
            except DistillAPIError as e:
                if e.status != 409:
                    raise
                current = client.webhooks.get_secret()
                err.print(f"You already have a webhook secret ({escape(current['prefix'])}…, created "
                          f"{escape(str(current['created_at']))}); it was shown when it was made. "
                          "[bold]distill webhooks secret --rotate[/] replaces it.")  # fmt: skip
                raise typer.Exit(1) from None
    if json_out:
        _print_json(row)
        return
    typer.echo(row["secret"])
    note = "Store it now: it is not shown again. Receivers verify Distill-Signature with it (README, Webhooks)."
    if row.get("previous_expires_at"):
        note += f" The previous secret also signs deliveries until {row['previous_expires_at']}."
    err.print(f"[dim]{escape(note)}[/]")


# ---- jobs -----------------------------------------------------------------------------------------


@jobs_app.command("create")
def jobs_create(
    ctx: typer.Context,
    spec_file: Annotated[
        str, typer.Option("-f", "--file", help="Job spec: .json, .yaml/.yml, or - for stdin.")
    ],
    idempotency_key: Annotated[str | None, typer.Option(help="Repeat-safe creation key.")] = None,
    webhook_url: Annotated[
        str | None, typer.Option(help="POSTed (signed) when the job ends; overrides the spec's webhook_url.")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Then wait for it with a progress bar.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Create a distillation job from a spec file."""
    spec = _load_spec(spec_file)
    with _state(ctx).client() as client:
        job = client.jobs.create(spec, idempotency_key=idempotency_key, webhook_url=webhook_url)
        if json_out:
            _print_json(job)
        else:
            out.print(_job_table(job))
        if wait:
            with _job_progress() as progress:
                job = _watch(client, job["id"], progress, label=job.get("name") or job["id"])
            raise typer.Exit(_report_outcome(job))


@jobs_app.command("list")
def jobs_list(
    ctx: typer.Context,
    status: Annotated[
        str | None, typer.Option(help="queued, running, succeeded, failed or cancelled.")
    ] = None,
    limit: Annotated[int, typer.Option(min=0, help="At most this many (0 = all).")] = 20,
    json_out: JsonOpt = False,
) -> None:
    """List your jobs, newest first."""
    with _state(ctx).client() as client:
        jobs = client.jobs.list(status=status, limit=limit or None)
    if json_out:
        _print_json({"object": "list", "data": jobs})
    elif not jobs:
        err.print("no jobs")
    else:
        out.print(_jobs_table(jobs))


@jobs_app.command("get")
def jobs_get(ctx: typer.Context, job_id: str, json_out: JsonOpt = False) -> None:
    """Show one job: status, progress, error and latest metrics."""
    with _state(ctx).client() as client:
        job = client.jobs.get(job_id)
    if json_out:
        _print_json(job)
    else:
        out.print(_job_table(job))


@jobs_app.command("cancel")
def jobs_cancel(ctx: typer.Context, job_id: str, json_out: JsonOpt = False) -> None:
    """Cancel a queued job, or ask a running one to stop."""
    with _state(ctx).client() as client:
        job = client.jobs.cancel(job_id)
    if json_out:
        _print_json(job)
    else:
        err.print(f"{job_id}: {_status(job['status'])}")


@jobs_app.command("wait")
def jobs_wait(
    ctx: typer.Context,
    job_id: str,
    poll: Annotated[
        float, typer.Option(min=0.05, help="Seconds between polls when the events stream is unavailable.")
    ] = 1.0,
    timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds.")] = None,
    stream: Annotated[
        bool, typer.Option("--stream/--no-stream", help="Follow the job's Server-Sent Events (else poll).")
    ] = True,
    json_out: JsonOpt = False,
) -> None:
    """Follow a job's events with a progress bar; exit 0 if it succeeded, 1 if it failed or was cancelled."""
    with _state(ctx).client() as client, _job_progress() as progress:
        job = _watch(client, job_id, progress, poll_s=poll, timeout_s=timeout, stream=stream)
    if json_out:
        _print_json(job)
    raise typer.Exit(_report_outcome(job))


@jobs_app.command("events")
def jobs_events(
    ctx: typer.Context,
    job_id: str,
    after: Annotated[int | None, typer.Option(help="Only events after this event id.")] = None,
    follow: Annotated[
        bool, typer.Option("--follow", help="Keep printing new events until the job ends.")
    ] = False,
    poll: Annotated[float, typer.Option(min=0.05, help="Seconds between polls with --follow.")] = 1.0,
    json_out: JsonOpt = False,
) -> None:
    """Print a job's event log."""
    with _state(ctx).client() as client:
        while True:
            events = client.jobs.events(job_id, after=after)
            if json_out:
                for e in events:
                    typer.echo(json.dumps(e, ensure_ascii=False))
            else:
                for e in events:
                    level = e.get("level", "info")
                    colour = {"error": "red", "warning": "yellow"}.get(level, "dim")
                    out.print(f"[dim]{e['id']:>5}[/] {_ts(e.get('created_at'))} [{colour}]{level:<7}[/] "
                              f"{escape(e.get('message', ''))}")  # fmt: skip
            if events:
                after = events[-1]["id"]
            if not follow:
                return
            if client.jobs.get(job_id)["status"] in ("succeeded", "failed", "cancelled"):
                for e in client.jobs.events(job_id, after=after):  # anything written while we looked
                    out.print(
                        f"[dim]{e['id']:>5}[/] {_ts(e.get('created_at'))} {escape(e.get('message', ''))}"
                    )
                return
            time.sleep(poll)


@jobs_app.command("metrics")
def jobs_metrics(ctx: typer.Context, job_id: str, json_out: JsonOpt = False) -> None:
    """Per-epoch training curve and the latest summary."""
    with _state(ctx).client() as client:
        metrics = client.jobs.metrics(job_id)
    if json_out:
        _print_json(metrics)
        return
    table = Table(show_edge=False, header_style="bold", title=f"{job_id}: per-epoch")
    for col in ("epoch", "train loss", "val acc", "agreement", "seconds"):
        table.add_column(col, justify="right")
    for row in metrics.get("data", []):
        d = row.get("data") or {}
        loss = d.get("train_loss")
        secs = d.get("seconds")
        table.add_row(str(row.get("epoch")), "–" if loss is None else f"{loss:.4f}", _pct(d.get("val_accuracy")),
                      _pct(d.get("teacher_agreement")), "–" if secs is None else f"{secs:.2f}")  # fmt: skip
    out.print(table)


@jobs_app.command("artifacts")
def jobs_artifacts(ctx: typer.Context, job_id: str, json_out: JsonOpt = False) -> None:
    """List a succeeded job's outputs."""
    with _state(ctx).client() as client:
        arts = client.jobs.artifacts(job_id)
    if json_out:
        _print_json({"object": "list", "data": arts})
        return
    table = Table(show_edge=False, header_style="bold")
    for col in ("name", "size", "sha256", "content type"):
        table.add_column(col)
    for a in arts:
        table.add_row(
            escape(a["name"]),
            _human_bytes(a.get("bytes")),
            a.get("sha256", "")[:12],
            a.get("content_type", ""),
        )
    out.print(table)


def _download(client: DistillClient, job_id: str, out_dir: Path) -> list[Path]:
    with _byte_progress() as progress:
        tasks: dict[str, Any] = {}

        def cb(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = progress.add_task(name, total=total or None)
            progress.update(tasks[name], completed=done)

        return client.jobs.download(job_id, out_dir, on_progress=cb)


@jobs_app.command("download")
def jobs_download(
    ctx: typer.Context,
    job_id: str,
    out_dir: Annotated[
        Path, typer.Option("--out", "-o", help="Directory to write the artifacts into.")
    ] = Path("."),
) -> None:
    """Download every artifact of a job, each checked against its sha256."""
    with _state(ctx).client() as client:
        paths = _download(client, job_id, out_dir)
    if not paths:
        err.print(f"{job_id} has no artifacts (yet)")
    for p in paths:
        out.print(f"[green]✓[/] {p}  ({_human_bytes(p.stat().st_size)}, sha256 verified)")


# ---- demo -----------------------------------------------------------------------------------------


def _first(*values: Any) -> Any:
    """The first value that is not None; a per-teacher list counts as its first element (one teacher here)."""
    for v in values:
        if isinstance(v, (list, tuple)):
            v = v[0] if v else None
        if v is not None:
            return v
    return None


def demo_specs(*, epochs_teacher: int, epochs: int, temperature: float, alpha: float, seed: int,
               teacher_job: str | None = None) -> tuple[dict, dict]:  # fmt: skip
    """The two demo jobs: a cnn1d teacher trained supervised, then an mlp student distilled from it."""
    teacher = {
        "name": "demo-teacher-cnn1d",
        "student": {"architecture": {"name": "cnn1d", "config": {"channels": 128}}},
        "train_file": "builtin:mnist1d",
        "method": {"type": "supervised"},
        "hyperparameters": {"epochs": epochs_teacher, "seed": seed},
        "metadata": {"demo": "teacher"},
    }
    student = {
        "name": "demo-kd-cnn1d-to-mlp",
        "teachers": [{"from_job": teacher_job or "job_" + "0" * 22}],
        "student": {"architecture": {"name": "mlp", "config": {"hidden_sizes": [256, 256]}}},
        "train_file": "builtin:mnist1d",
        "method": {"type": "kd", "temperature": temperature, "alpha": alpha},
        "hyperparameters": {"epochs": epochs, "seed": seed, "baseline": True},
        "metadata": {"demo": "student"},
    }
    return teacher, student


def demo_summary(teacher_job: dict, kd_job: dict) -> dict:
    """The numbers the demo reports, from both jobs' metrics.

    The KD job reports its teacher's numbers per teacher (lists); the teacher job's own summary fills any gap.
    `kd_gain` is in accuracy points; gain and gap are recomputed from the accuracies when not reported.
    """
    tm, km = teacher_job.get("metrics") or {}, kd_job.get("metrics") or {}
    teacher_acc = _first(km.get("teacher_accuracy"), tm.get("val_accuracy"))
    base_acc = km.get("baseline_accuracy")
    kd_acc = km.get("val_accuracy")
    gain = km.get("kd_gain")
    if gain is None and kd_acc is not None and base_acc is not None:
        gain = 100 * (kd_acc - base_acc)
    gap = km.get("gap_recovered")
    if gap is None and None not in (kd_acc, base_acc, teacher_acc) and teacher_acc > base_acc:
        gap = (kd_acc - base_acc) / (teacher_acc - base_acc)
    return {
        "teacher_job": teacher_job["id"], "kd_job": kd_job["id"],
        "teacher_accuracy": teacher_acc, "baseline_accuracy": base_acc, "kd_accuracy": kd_acc,
        "kd_gain_points": gain, "gap_recovered": gap,
        "teacher_params": _first(km.get("teacher_params"), tm.get("student_params")),
        "teacher_bytes": _first(km.get("teacher_bytes"), tm.get("student_bytes")),
        "student_params": km.get("student_params"), "student_bytes": km.get("student_bytes"),
        "compression_ratio": km.get("compression_ratio"), "agreement": km.get("agreement"),
        "speedup": km.get("speedup"),
        "teacher_latency_ms": _first(km.get("teacher_latency_ms"), tm.get("student_latency_ms")),
        "student_latency_ms": km.get("student_latency_ms"),
    }  # fmt: skip


def _demo_tables(s: dict, kd_spec: dict) -> tuple[Table, Table]:
    m = kd_spec["method"]
    models = Table(title="Distillation demo on builtin:mnist1d (validation split)", header_style="bold")
    for col, justify in (("model", "left"), ("architecture", "left"), ("accuracy", "right"),
                         ("parameters", "right"), ("size", "right"), ("latency/sample", "right")):  # fmt: skip
        models.add_column(col, justify=justify)  # type: ignore[arg-type]

    def ms(v):
        return "–" if v is None else f"{v:.4f} ms"

    models.add_row(
        "teacher (supervised)",
        "cnn1d(channels=128)",
        _pct(s["teacher_accuracy"]),
        _int(s["teacher_params"]),
        _human_bytes(s["teacher_bytes"]),
        ms(s["teacher_latency_ms"]),
    )
    models.add_row(
        "student baseline (supervised, same budget)",
        "mlp(hidden_sizes=[256, 256])",
        _pct(s["baseline_accuracy"]),
        _int(s["student_params"]),
        _human_bytes(s["student_bytes"]),
        ms(s["student_latency_ms"]),
    )
    models.add_row(f"[bold]student, KD (T={m['temperature']:g}, α={m['alpha']:g})[/]", "mlp(hidden_sizes=[256, 256])",
                   f"[bold]{_pct(s['kd_accuracy'])}[/]", _int(s["student_params"]),
                   _human_bytes(s["student_bytes"]), ms(s["student_latency_ms"]))  # fmt: skip
    gain = s["kd_gain_points"]
    summary = Table(show_header=False, title="What distillation bought", box=None, padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column(justify="right")
    summary.add_row(
        "KD gain over the baseline",
        "–" if gain is None else f"[{'green' if gain > 0 else 'red'}]{gain:+.2f} points[/]",
    )
    summary.add_row("teacher–baseline gap recovered", _pct(s["gap_recovered"]))
    summary.add_row("student–teacher agreement (top-1)", _pct(s["agreement"]))
    summary.add_row("compression (teacher / student params)", _times(s["compression_ratio"]))
    summary.add_row("speed-up (CPU latency)", _times(s["speedup"]))
    return models, summary


@app.command()
def convert(
    checkpoint: Annotated[Path, typer.Argument(help="A PyTorch state-dict checkpoint (.pt / .pth).")],
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Where to write (default: CHECKPOINT.safetensors).")
    ] = None,
    key: Annotated[
        str | None, typer.Option(help="The entry holding the weights, e.g. state_dict or model/ema.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite the output if it exists.")] = False,
) -> None:
    """Convert a PyTorch checkpoint to safetensors on this machine, ready to upload as a teacher (needs torch)."""
    from distill_tools.convert import ConversionError, convert_checkpoint

    try:
        report = convert_checkpoint(checkpoint, output, key=key, overwrite=force)
    except ConversionError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}")
        raise typer.Exit(1) from None
    if report.unwrapped:
        err.print(f"[dim]weights from entry {escape('/'.join(report.unwrapped))!r}"
                  + (f"; ignored {escape(', '.join(report.ignored_keys))}" if report.ignored_keys else "") + "[/]")  # fmt: skip
    if report.stripped_prefix:
        err.print(f"[dim]stripped the {escape(report.stripped_prefix)!r} prefix from every key[/]")
    err.print(f"[green]✓[/] wrote {escape(str(report.output))} ({_human_bytes(report.bytes)})")
    out.print(f"tensors     {report.tensors:,}\nparameters  {report.parameters:,}\nsha256      {report.sha256}")
    out.print(f"[dim]upload it: distill files upload {escape(str(report.output))} --purpose teacher[/]")


@app.command()
def demo(
    ctx: typer.Context,
    epochs_teacher: Annotated[int, typer.Option(min=1, help="Teacher training epochs.")] = 8,
    epochs: Annotated[int, typer.Option(min=1, help="Student epochs (KD and the baseline alike).")] = 60,
    temperature: Annotated[float, typer.Option(min=0.01, help="KD temperature.")] = 4.0,
    alpha: Annotated[float, typer.Option(min=0.0, max=1.0, help="Weight of the KD term.")] = 0.5,
    seed: Annotated[int, typer.Option(min=0, help="Training seed.")] = 0,
    out_dir: Annotated[Path, typer.Option("--out", help="Where to download both jobs' artifacts.")] = Path(
        "var/demo"
    ),
    poll: Annotated[float, typer.Option(min=0.05, help="Seconds between polls.")] = 1.0,
    json_out: JsonOpt = False,
) -> None:
    """End to end on a running service: train a cnn1d teacher, distil it into a small mlp, compare with a baseline."""
    with _state(ctx).client() as client:
        teacher_spec, _ = demo_specs(epochs_teacher=epochs_teacher, epochs=epochs, temperature=temperature,
                                     alpha=alpha, seed=seed)  # fmt: skip
        with _job_progress() as progress:
            teacher = client.jobs.create(teacher_spec)
            err.print(f"1/3 teacher job {teacher['id']}: cnn1d, supervised, {epochs_teacher} epochs")
            teacher = _watch(client, teacher["id"], progress, label="teacher cnn1d", poll_s=poll)
            if _report_outcome(teacher) != 0:
                raise typer.Exit(1)
            _, kd_spec = demo_specs(epochs_teacher=epochs_teacher, epochs=epochs, temperature=temperature,
                                    alpha=alpha, seed=seed, teacher_job=teacher["id"])  # fmt: skip
            kd = client.jobs.create(kd_spec)
            err.print(f"2/3 KD job {kd['id']}: mlp student, kd T={temperature:g} α={alpha:g}, {epochs} epochs "
                      "+ the same student supervised as the baseline")  # fmt: skip
            kd = _watch(client, kd["id"], progress, label="student mlp (KD + baseline)", poll_s=poll)
        if _report_outcome(kd) != 0:
            raise typer.Exit(1)
        err.print(f"3/3 downloading artifacts to {out_dir}")
        teacher_paths = _download(client, teacher["id"], out_dir / "teacher")
        kd_paths = _download(client, kd["id"], out_dir / "student")
    summary = demo_summary(teacher, kd)
    summary["artifacts"] = {"teacher": [str(p) for p in teacher_paths], "student": [str(p) for p in kd_paths]}
    if json_out:
        _print_json(summary)
        return
    models, gains = _demo_tables(summary, kd_spec)
    out.print(models)
    out.print(gains)
    out.print(f"artifacts: {out_dir / 'teacher'} ({len(teacher_paths)} files), "
              f"{out_dir / 'student'} ({len(kd_paths)} files)")  # fmt: skip


def main() -> None:
    app(prog_name="distill")


if __name__ == "__main__":
    main()
