"""The console of an entry point: the run's own lines and errors; other libraries' chatter off."""

import io
import logging

import pytest

from ddpo_ray.infra.logs import quiet_serve_driver_lines, setup_console_logging


@pytest.fixture
def restored_logging():
    """Put the root logger's and Serve's handlers back as they were (logging is process-wide)."""
    import ray.serve  # noqa: F401 - sets up Serve's driver-side logger, as a run's import does

    root, serve = logging.getLogger(), logging.getLogger("ray.serve")
    saved = (root.level, list(root.handlers), [(h, h.level, getattr(h, "stream", None)) for h in serve.handlers])
    yield serve
    root.setLevel(saved[0])
    root.handlers = saved[1]
    for handler, level, stream in saved[2]:
        handler.setLevel(level)
        if stream is not None:
            handler.setStream(stream)


def test_the_quiet_console_shows_own_lines_and_errors_only(restored_logging, capsys):
    setup_console_logging(verbose=False)
    logging.getLogger("ddpo_ray.run").info("epoch    0 | own line")
    logging.getLogger("some_library").info("a library's notice")
    logging.getLogger("some_library").error("a library's error")
    printed = capsys.readouterr().out
    assert "own line" in printed and "a library's error" in printed
    assert "notice" not in printed


@pytest.mark.parametrize("verbose", [False, True])
def test_serve_driver_info_lines_show_only_when_verbose(restored_logging, verbose):
    """Serve prints "Started Serve", "Application ... is ready" and "Deleting app" lines on a
    stream handler of its own; a run's console (make run) showed them among its epoch lines."""
    serve_logger = restored_logging
    streams = [h for h in serve_logger.handlers if isinstance(h, logging.StreamHandler)]
    assert streams, "Serve's driver-side logger has no stream handler to quiet"
    printed_to = io.StringIO()
    for handler in streams:
        handler.setStream(printed_to)  # what it would have printed on the console
    quiet_serve_driver_lines(verbose)
    serve_logger.info("Application 'jpeg_compressibility' is ready")
    serve_logger.warning("a Serve warning")
    printed = printed_to.getvalue()
    assert "a Serve warning" in printed
    assert ("is ready" in printed) is verbose
