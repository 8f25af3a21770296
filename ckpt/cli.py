"""ckpt's command line: thin click commands over ckpt.actions. Flags follow CRIU's."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ckpt.errors import CkptError

F = TypeVar("F", bound=Callable[..., Any])


def reports_errors(fn: F) -> F:
    """Expected failures become one `Error: ...` line and an exit code; --debug shows more."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CkptError as exc:
            if os.environ.get("CKPT_DEBUG"):
                raise
            click.echo(f"Error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("Error: interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:  # `ckpt show ... | head`: the reader went away
            sys.exit(141)
        except Exception as exc:  # a bug: still one line, the traceback with --debug
            if os.environ.get("CKPT_DEBUG"):
                raise
            click.echo(f"Error: internal error: {type(exc).__name__}: {exc} "
                       "(--debug shows the traceback)", err=True)
            sys.exit(70)

    return wrapper  # type: ignore[return-value]


def run() -> None:
    """Console entry point: usage errors, too, are one `Error:` line (no usage dump)."""
    try:
        code = main(standalone_mode=False)
    except click.ClickException as exc:
        click.echo(f"Error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("Error: aborted", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ckpt")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def main(debug: bool) -> None:
    """Checkpoint and restore running Linux processes."""
    if debug:
        os.environ["CKPT_DEBUG"] = "1"


@main.command()
@click.option("--feature", "features", multiple=True, metavar="NAME",
              help="Exit non-zero unless this feature works (as CRIU's check --feature); "
                   "repeatable. Names are those `ckpt check` lists.")
@reports_errors
def check(features: tuple[str, ...]) -> None:
    """Probe what this kernel supports, one line per feature."""
    from ckpt.actions.check import format_capabilities, meaning, missing
    from ckpt.kernel.probe import probe

    caps = probe()
    click.echo(format_capabilities(caps))
    for line in meaning(caps):
        click.echo(f"  {line}")
    from ckpt.collect.restorable import table_lines

    click.echo("state a dump carries (the rest is refused before the freeze):")
    for line in table_lines():
        click.echo(f"  {line}")
    why = missing(caps, features)
    if why:
        raise CkptError(why)


SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(ctx: click.Context | None, param: click.Parameter | None, value: str) -> int:
    """"1M", "512K", "4096": a size in bytes (CRIU's --ghost-limit syntax)."""
    text = value.strip().upper().removesuffix("B")
    unit = text[-1:] if text[-1:].isalpha() else ""
    number = text.removesuffix(unit)
    if not number.isdigit() or unit not in SIZE_UNITS:
        raise click.BadParameter(f"{value!r} is not a size (bytes, or with K, M or G)")
    return int(number) * SIZE_UNITS[unit]


def ghost_limit_option(fn: F) -> F:
    return click.option(
        "--ghost-limit", default="1M", show_default=True, metavar="SIZE", callback=parse_size,
        help="Save deleted files still open and memfds up to this size (K, M, G); larger "
             "ones are refused.")(fn)


def target_options(fn: F) -> F:
    """Options shared by dump and predump (CRIU's names)."""
    for opt in reversed([
        click.option("-t", "--tree", "pid", type=int, required=True,
                     help="PID of the process to checkpoint."),
        click.option("-D", "--images-dir", required=True, type=click.Path(file_okay=False),
                     help="Directory to write the images to."),
        click.option("--prev-images-dir", metavar="DIR",
                     help="Parent images (relative to -D, as in CRIU): store only changes."),
        click.option("--overwrite", is_flag=True,
                     help="Replace a complete checkpoint already in -D (passes dumped "
                          "against it will refuse to restore)."),
        click.option("--track", type=click.Choice(["auto", "uffd-wp", "soft-dirty", "compare"]),
                     default="auto", show_default=True,
                     help="Dirty-page tracking backend (auto: the best this kernel has)."),
        click.option("--compress-level", type=int, default=-1, show_default=True,
                     help="zstd level for page data (negative is faster)."),
        click.option("--page-server", metavar="HOST:PORT",
                     help="Also send the images of this pass to a `ckpt page-server`."),
        click.option("--auth-token-file", type=click.Path(dir_okay=False),
                     help="Shared secret for the page server (never sent in clear)."),
        click.option("--tls-cacert", type=click.Path(dir_okay=False),
                     help="Talk TLS to the page server, trusting this CA."),
        click.option("--tcp-close", is_flag=True,
                     help="Accept established TCP connections: restored closed (the "
                          "process sees a reset), a listener's unaccepted ones dropped."),
    ]):
        fn = opt(fn)
    return fn


@main.command()
@target_options
@ghost_limit_option
@reports_errors
def predump(pid: int, images_dir: str, prev_images_dir: str | None, track: str,
            compress_level: int, page_server: str | None, auth_token_file: str | None,
            tls_cacert: str | None, overwrite: bool, ghost_limit: int,
            tcp_close: bool) -> None:
    """Copy memory while the process runs; freeze only to arm dirty tracking."""
    from ckpt.actions.predump import PredumpOptions
    from ckpt.actions.predump import predump as do_predump

    check_page_server(page_server, auth_token_file, tls_cacert, images_dir)
    click.echo(do_predump(PredumpOptions(pid=pid, images_dir=images_dir,
                                         prev_images_dir=prev_images_dir, track=track,
                                         compress_level=compress_level,
                                         overwrite=overwrite, ghost_limit=ghost_limit,
                                         tcp_close=tcp_close)),
               err=True)
    send_to_page_server(images_dir, page_server, auth_token_file, tls_cacert)


@main.command()
@target_options
@click.option("-R", "--leave-running", is_flag=True, help="Let the process run on after dump.")
@click.option("-j", "--shell-job", is_flag=True,
              help="The process uses the terminal: restore takes stdin/out/err from it.")
@click.option("--incremental", is_flag=True,
              help="Store only pages changed since --prev-images-dir (needs tracking).")
@click.option("--track-mem", is_flag=True,
              help="Keep dirty tracking armed after the dump (with --leave-running).")
@click.option("--precopy/--no-precopy", default=True, show_default=True,
              help="With --incremental and uffd-wp: read what changed since the parent "
                   "before freezing; the freeze copies only what is written after that.")
@ghost_limit_option
@reports_errors
def dump(pid: int, images_dir: str, prev_images_dir: str | None, track: str, compress_level: int,
         page_server: str | None, auth_token_file: str | None, tls_cacert: str | None,
         leave_running: bool, shell_job: bool, incremental: bool, track_mem: bool,
         precopy: bool, overwrite: bool, ghost_limit: int,
         tcp_close: bool) -> None:
    """Checkpoint process PID into images; the process is killed unless --leave-running."""
    from ckpt.actions.dump import DumpOptions
    from ckpt.actions.dump import dump as do_dump

    check_page_server(page_server, auth_token_file, tls_cacert, images_dir)
    res = do_dump(DumpOptions(pid=pid, images_dir=images_dir, leave_running=leave_running,
                              shell_job=shell_job, compress_level=compress_level,
                              incremental=incremental or bool(prev_images_dir),
                              prev_images_dir=prev_images_dir, track=track,
                              track_mem=track_mem, precopy=precopy, overwrite=overwrite,
                              ghost_limit=ghost_limit, tcp_close=tcp_close))
    click.echo(f"{res.line}; {res.threads} thread(s), {res.vmas} VMAs", err=True)
    for fd, name in res.externals:
        click.echo(f"fd {fd} leads outside the dump ({name}): restore it with --inherit-fd "
                   f"fd[N]:{name}, N an fd of ckpt standing for it", err=True)
    send_to_page_server(images_dir, page_server, auth_token_file, tls_cacert)


def check_page_server(page_server: str | None, auth_token_file: str | None,
                      tls_cacert: str | None, images_dir: str) -> None:
    """Refuse a bad --page-server (address, token, TLS, a pass name the server would
    refuse) before the target is touched."""
    if page_server is None:
        return
    host, port = parse_address(page_server)
    if auth_token_file is None:
        raise CkptError("--page-server needs --auth-token-file")
    from ckpt.transfer import check_server, client_tls_context, load_token, pass_name

    pass_name(images_dir)

    check_server(host, port, load_token(auth_token_file),
                 client_tls_context(tls_cacert) if tls_cacert else None)


def parse_address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise CkptError(f"--page-server wants HOST:PORT, not {value!r}")
    return host.strip("[]"), int(port)


def send_to_page_server(images_dir: str, page_server: str | None, auth_token_file: str | None,
                        tls_cacert: str | None) -> None:
    """Send the pass just written to the page server, under the same directory name, so
    that its parent links (../1) resolve there as they do here."""
    if page_server is None or auth_token_file is None:
        return
    from ckpt.transfer import client_tls_context, load_token, pass_name, send_pass

    host, port = parse_address(page_server)
    tls = client_tls_context(tls_cacert) if tls_cacert else None
    sent = send_pass(host, port, load_token(auth_token_file), images_dir,
                     pass_name(images_dir), tls=tls)
    click.echo(f"sent {sent.files} files ({sent.bytes / 2**20:.2f} MiB) to {page_server}",
               err=True)


@main.command()
@click.option("-t", "--tree", "pid", type=int, required=True, help="PID of the process to move.")
@click.option("--to", "dest", required=True, metavar="HOST:PORT",
              help="The destination's `ckpt page-server`.")
@click.option("--auth-token-file", required=True, type=click.Path(dir_okay=False),
              help="Shared secret of the page server.")
@click.option("--tls-cacert", type=click.Path(dir_okay=False), help="Use TLS, trusting this CA.")
@click.option("--max-downtime-ms", type=float, default=50.0, show_default=True,
              help="Stop pre-copying once the final round is expected to fit this.")
@click.option("--max-rounds", type=int, default=8, show_default=True)
@click.option("--track", type=click.Choice(["auto", "uffd-wp", "soft-dirty", "compare"]),
              default="auto", show_default=True)
@click.option("--keep-images", type=click.Path(file_okay=False),
              help="Keep the source's images in this directory.")
@click.option("--auto-converge", is_flag=True,
              help="Throttle a process that dirties memory faster than the link carries it.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--tcp-close", is_flag=True,
              help="Accept established TCP connections: restored closed at the destination.")
@click.option("--plot", type=click.Path(dir_okay=False),
              help="Draw dirty pages and bytes per round into this PNG (needs matplotlib).")
@ghost_limit_option
@reports_errors
def migrate(pid: int, dest: str, auth_token_file: str, tls_cacert: str | None,
            max_downtime_ms: float, max_rounds: int, track: str, keep_images: str | None,
            auto_converge: bool, as_json: bool, plot: str | None, ghost_limit: int,
            tcp_close: bool) -> None:
    """Move a running process to another host: iterative pre-copy, then a short freeze."""
    import json

    from ckpt.actions.migrate import MigrateOptions
    from ckpt.actions.migrate import migrate as do_migrate
    from ckpt.transfer import client_tls_context, load_token

    host, port = parse_address(dest)
    if plot:
        from ckpt.actions.plot import require_matplotlib

        require_matplotlib()
    res = do_migrate(MigrateOptions(
        pid=pid, host=host, port=port, token=load_token(auth_token_file),
        tls=client_tls_context(tls_cacert) if tls_cacert else None, max_rounds=max_rounds,
        max_downtime_ms=max_downtime_ms, track=track, keep_images=keep_images,
        auto_converge=auto_converge, ghost_limit=ghost_limit, tcp_close=tcp_close),
        report=lambda line: None if as_json else click.echo(line))
    per_round: list[dict[str, Any]] = [
        {"round": r.n, "dirty_pages": r.dirty_pages, "bytes": r.bytes_sent,
         "seconds": round(r.seconds, 3)} for r in res.rounds]
    summary = {"pid": res.new_pid, "rounds": len(res.rounds), "bytes": res.bytes_sent,
               "total_s": round(res.total_s, 3), "frozen_ms": round(res.frozen_ms, 1),
               "restore_ms": round(res.restore_ms, 1), "restore_warm": res.restore_warm,
               "downtime_parts_ms": res.downtime_parts,
               "downtime_ms": round(res.downtime_ms, 1),
               "stop_reason": res.stop_reason, "per_round": per_round}
    if plot:
        from ckpt.actions.plot import plot_rounds

        plot_rounds(per_round, plot, f"ckpt migrate: pid {pid} to {dest}, "
                    f"downtime {res.downtime_ms:.0f} ms")
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(f"migrated to {dest} as pid {res.new_pid}: {len(res.rounds)} rounds, "
                   f"{res.bytes_sent / 2**20:.2f} MiB, total {res.total_s:.2f} s, frozen "
                   f"{res.frozen_ms:.1f} ms, restore {res.restore_ms:.1f} ms"
                   f"{' (warm)' if res.restore_warm else ''}, downtime "
                   f"{res.downtime_ms:.1f} ms ({res.stop_reason})")


@main.command("page-server")
@click.option("--address", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=27000, show_default=True)
@click.option("-D", "--images-dir", required=True, type=click.Path(file_okay=False),
              help="Where received passes are stored, one subdirectory each.")
@click.option("--auth-token-file", required=True, type=click.Path(dir_okay=False),
              help="Shared secret the senders must prove they know.")
@click.option("--tls-cert", type=click.Path(dir_okay=False), help="Serve TLS with this cert.")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="Key of --tls-cert.")
@click.option("--once", is_flag=True, help="Exit after the first connection.")
@click.option("--commit-grace", type=click.FloatRange(min=0), default=30.0, show_default=True,
              metavar="SECONDS", help="How long a migrated process whose link broke before "
              "the commit waits, stopped, for the source to commit it.")
@click.option("--handshake-timeout", type=click.FloatRange(min=0.1), default=5.0,
              show_default=True, metavar="SECONDS",
              help="A client not authenticated (TLS included) by then is dropped.")
@click.option("--max-connections", type=click.IntRange(min=1), default=64, show_default=True,
              help="Connections served at once; more are told the server is busy.")
@click.option("--max-connections-per-peer", type=click.IntRange(min=1), default=16,
              show_default=True, help="Connections served at once from one host.")
@click.option("-o", "--log-file", type=click.Path(dir_okay=False),
              help="Log here instead of to stderr.")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages too.")
@reports_errors
def page_server(address: str, port: int, images_dir: str, auth_token_file: str,
                tls_cert: str | None, tls_key: str | None, once: bool,
                commit_grace: float, handshake_timeout: float, max_connections: int,
                max_connections_per_peer: int, log_file: str | None, verbose: bool) -> None:
    """Receive checkpoint passes sent with --page-server (CRIU's page-server)."""
    import logging

    from ckpt.transfer import load_token, serve, server_tls_context
    from ckpt.transfer.listener import Limits

    try:
        handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler()
    except OSError as exc:
        raise CkptError(f"cannot open log file {log_file}: {exc.strerror}") from None
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler],
                        format="%(asctime)s %(levelname)s %(message)s")
    tls = server_tls_context(tls_cert, tls_key) if tls_cert else None
    serve(address, port, images_dir, load_token(auth_token_file), tls=tls, once=once,
          ready=lambda p: click.echo(f"page server listening on {address}:{p}", err=True),
          commit_grace=commit_grace,
          limits=Limits(handshake_timeout, max_connections, max_connections_per_peer))


@main.command()
@click.option("-D", "--images-dir", required=True, type=click.Path(file_okay=False),
              help="Directory holding the images.")
@click.option("-d", "--restore-detached", is_flag=True,
              help="Return once the process runs instead of waiting for it.")
@click.option("--pidfile", type=click.Path(dir_okay=False), help="Write the restored PID here.")
@click.option("--new-pid", is_flag=True, help="Restore under a fresh PID if the old one is taken.")
@click.option("--skip-file-check", is_flag=True,
              help="Reopen files that changed since the dump (shrunk, rewritten) anyway.")
@click.option("--inherit-fd", "inherit_fd", multiple=True, metavar="fd[N]:OBJECT",
              help="ckpt's fd N stands for the external OBJECT (e.g. pipe:[1234]) the dump "
                   "recorded; repeatable.")
@reports_errors
def restore(images_dir: str, restore_detached: bool, pidfile: str | None, new_pid: bool,
            skip_file_check: bool, inherit_fd: tuple[str, ...]) -> None:
    """Restore a process from images; without -d wait for it and exit with its status."""
    from ckpt.actions.restore import RestoreOptions, wait_restored
    from ckpt.actions.restore import restore as do_restore
    from ckpt.restore.files import parse_inherit_fds

    res = do_restore(RestoreOptions(images_dir=images_dir, new_pid=new_pid,
                                    skip_file_check=skip_file_check,
                                    inherit=parse_inherit_fds(inherit_fd)))
    if pidfile:
        with open(pidfile, "w") as f:
            f.write(f"{res.pid}\n")
    more = f" and {len(res.pids) - 1} more processes of its tree" if len(res.pids) > 1 else ""
    click.echo(f"restored pid {res.pid}{more} in {res.total_ms:.1f} ms", err=True)
    if not restore_detached:
        sys.exit(wait_restored(res.pid))


@main.command()
@click.argument("images_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@reports_errors
def show(images_dir: str, as_json: bool) -> None:
    """Show what an images directory holds (like crit show)."""
    from ckpt.actions.show import render_json, render_text, summarize

    summary = summarize(images_dir)
    click.echo(render_json(summary) if as_json else render_text(summary))
