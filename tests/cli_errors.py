"""The one check every CLI error test makes: exit status 2, one line on stderr, no traceback."""


def one_line_error(rc, err, *needles):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("qkvgguf: error: "), err
    for n in needles:
        assert n in lines[0], lines[0]
