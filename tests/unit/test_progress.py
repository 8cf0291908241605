import io

from lxd_image_server.progress import TerminalProgress, for_terminal, human


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_human():
    assert human(512) == "512 B"
    assert human(1536) == "1.5 KiB"
    assert human(3 * 1024**3) == "3.0 GiB"


def test_progress_shows_bytes_of_total_and_ends_with_newline():
    out = Tty()
    p = TerminalProgress(out)
    advance = p(4 << 20)
    for _ in range(4):
        advance(1 << 20)
    text = out.getvalue()
    assert "hashing 4.0 MiB of 4.0 MiB (100%" in text
    assert text.endswith("\n")


def test_only_on_a_terminal():
    assert for_terminal(io.StringIO()) is None
    assert isinstance(for_terminal(Tty()), TerminalProgress)
